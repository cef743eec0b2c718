"""How well each CLIP patch-map method localises a known answer (tiny random CLIP, offline).

A square of the prompt's colour is pasted at a random place on a neutral grey image; the map of
"a {colour} square" should be higher on the square's cells than elsewhere. Reported per method: the AUC of
map values (square cells vs other cells; 0.5 = chance) and the pointing-game hit rate (argmax cell inside
the square), over N images.

    python bench/clip_map_localization.py [--model DIR] [--n 24]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_maps import build_scorer  # noqa: E402
from u_nft.tiny_models import build_tiny_clip  # noqa: E402

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="CLIP directory (default: the tiny random CLIP)")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    model = args.model or str(build_tiny_clip(tempfile.mkdtemp()))
    gen = torch.Generator().manual_seed(0)
    grid = 7  # 224 / 32 for the tiny CLIP
    cell = args.size // grid
    images, prompts, masks = [], [], []
    for i in range(args.n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        img = torch.full((3, args.size, args.size), 0.5)
        r, c = (int(v) for v in torch.randint(0, grid - 1, (2,), generator=gen))
        img[:, r * cell:(r + 2) * cell, c * cell:(c + 2) * cell] = torch.tensor(rgb).view(3, 1, 1)
        mask = torch.zeros(grid, grid, dtype=torch.bool)
        mask[r:r + 2, c:c + 2] = True
        images.append(img), prompts.append(f"a {name} square"), masks.append(mask)
    images, masks = torch.stack(images), torch.stack(masks)
    print(f"| map_method | AUC (square vs rest) | pointing hit rate | n = {args.n} |\n|---|---|---|---|")
    for method in ("value_path", "maskclip", "grad_x_input", "occlusion"):
        scorer = build_scorer("clipscore_map", model=model, map_method=method, map_size=grid)
        maps = scorer(images, prompts, [{}] * args.n).maps
        aucs = [auc(m[k], m[~k]) for m, k in zip(maps, masks)]
        hits = [bool(k.flatten()[m.flatten().argmax()]) for m, k in zip(maps, masks)]
        print(f"| {method} | {sum(aucs) / len(aucs):.3f} | {sum(hits) / len(hits):.3f} (chance {4 / 49:.3f}) | |")


if __name__ == "__main__":
    main()
