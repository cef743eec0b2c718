"""A complete user-side scorer, as docs/custom_rewards.md shows it: use it from the config as
``config.reward_fn = {"reward_maps.examples:center_mask": 1.0}``. Nothing registers it; the
``package.module:callable`` name is enough (:func:`reward_maps.base.build_scorer`)."""
import torch

from reward_maps.base import RewardOutput, check_images


def center_mask(device="cpu", dtype=torch.float32, size=0.5):
    """Reward brightness inside a centred box covering ``size`` of each side; 0.5 (no signal) outside."""
    def scorer(images, prompts, metadata):
        check_images("center_mask", images, prompts, metadata)
        batch, _, height, width = images.shape
        top, left = round(height * (1 - size) / 2), round(width * (1 - size) / 2)
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[top : height - top, left : width - left] = True
        brightness = images.float().mean(dim=1)                      # (B, H, W) in [0, 1]
        maps = torch.where(inside, brightness, torch.tensor(0.5))    # the reward map
        scores = brightness[:, inside].mean(dim=1)                   # scalar: mean inside the box
        return RewardOutput(maps.cpu(), scores.cpu(), [{} for _ in range(batch)])
    return scorer
