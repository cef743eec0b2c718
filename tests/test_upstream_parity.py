"""Named configs, batch arithmetic, evaluation schedule and config-key names against upstream DiffusionNFT
(NVlabs/DiffusionNFT config/base.py, config/nft.py, scripts/train_nft_sd3.py), whose numbers are written
out independently here."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from u_nft.config_utils import derive_sizes
from u_nft.diagnostics import group_reward_statistics, policy_statistics, r_area_statistics
from u_nft.schedule import evaluation_due, first_decay_epoch
from u_nft.upstream_keys import UPSTREAM_KEYS, UPSTREAM_REWARD_NAMES, upstream_override_problems

REPO = Path(__file__).resolve().parents[1]


def named(name):
    spec = importlib.util.spec_from_file_location("u_nft_named_configs", REPO / "config" / "u_nft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


# ---- upstream's arithmetic, written out (config/nft.py _get_config, train_nft_sd3.py return_decay) ----

def upstream_batch_arithmetic(n_gpus, gradient_step_per_epoch, num_steps=10, timestep_fraction=0.99):
    k, num_groups, bsz = 24, 48, 9
    while True:
        assert bsz >= 1
        if num_groups * k % (n_gpus * bsz) == 0 and bsz * n_gpus % k == 0:
            n_batch_per_epoch = num_groups * k // (n_gpus * bsz)
            if n_batch_per_epoch % gradient_step_per_epoch == 0:
                break
        bsz -= 1
    accumulation = n_batch_per_epoch // gradient_step_per_epoch
    num_train_timesteps = int(num_steps * timestep_fraction)
    backward_per_epoch = n_batch_per_epoch * num_train_timesteps  # per rank (num_inner_epochs = 1)
    effective_accumulation = accumulation * num_train_timesteps
    return dict(images=num_groups * k, batch_size=bsz, batches=n_batch_per_epoch, backward=backward_per_epoch,
                accumulation=effective_accumulation, steps=backward_per_epoch // effective_accumulation)


def upstream_decay(step, decay_type):
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def upstream_first_decay_epoch(steps_per_epoch, decay_type):
    return next(e for e in range(10_000) if upstream_decay(steps_per_epoch * (e + 1), decay_type) > 0)


def test_scalar_baseline_on_8_ranks_matches_upstream_sd3_ocr_per_epoch():
    config = named("sd3_scalar_baseline")
    sizes = derive_sizes(config, world_size=8)
    upstream = upstream_batch_arithmetic(8, gradient_step_per_epoch=2)
    assert upstream == dict(images=1152, batch_size=9, batches=16, backward=144, accumulation=72, steps=2)
    backward = sizes.train_batches * sizes.num_train_timesteps * config.train.num_inner_epochs
    assert sizes.samples_per_epoch == upstream["images"] == 1152
    assert (config.sample.train_batch_size, sizes.sampling_batches) == (upstream["batch_size"], upstream["batches"])
    assert backward == upstream["backward"] == 144
    assert sizes.accumulation_steps == upstream["accumulation"] == 72
    assert backward // sizes.accumulation_steps == config.train.gradient_step_per_epoch == upstream["steps"] == 2
    # the old-policy decay ramp (decay type 2) starts after epoch 37 (0-based), at optimizer step 76
    assert config.train.decay_type == 2
    assert first_decay_epoch(2, 2) == upstream_first_decay_epoch(2, 2) == 37
    assert first_decay_epoch(1, 2) == upstream_first_decay_epoch(1, 2) == 75  # what 1 step per epoch gave


UPSTREAM_COMMON = {  # config/nft.py _get_config for sd3 (and config/base.py where nft.py keeps it)
    "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.guidance_scale": 1.0, "sample.resolution": 512,
    "sample.num_image_per_prompt": 24, "sample.num_groups": 48, "sample.train_batch_size": 9,
    "train.batch_size": 9, "sample.solver": "dpm2", "sample.eta": 0.0, "sample.eval_solver": "flow",
    "train.kl_weight": 1e-4, "train.beta": 1.0, "train.decay_type": 1, "train.adv_mode": "all",
    "train.adv_clip_max": 5.0, "train.timestep_fraction": 0.99, "train.learning_rate": 3e-4,
    "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.adam_weight_decay": 1e-4, "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0, "train.num_inner_epochs": 1, "train.ema": True, "lora.rank": 32, "lora.alpha": 64,
    "train.gradient_step_per_epoch": 1, "eval_freq": 10, "eval_at_start": True, "save_freq": 30, "seed": 42,
    "mixed_precision": "fp16", "pretrained.model": "stabilityai/stable-diffusion-3.5-medium",
    "sample.test_batch_size": 16, "sample.max_sequence_length": 128, "train.map_scale": "global",
    "train.map_normalization": "group", "num_epochs": 100000,
}
UPSTREAM_RUNS = {  # ours -> (upstream's dataset folder, reward_fn with our scorer names, its overrides)
    "sd3_ocr_map": ("ocr", {"ocr_map": 1.0}, {"train.gradient_step_per_epoch": 2, "train.beta": 0.1,
                                                "train.decay_type": 2}),
    "sd3_scalar_baseline": ("ocr", {"ocr_map": 1.0}, {"train.gradient_step_per_epoch": 2, "train.beta": 0.1,
                                                        "train.decay_type": 2}),
    "sd3_geneval_map": ("geneval", {"geneval_map": 1.0}, {"sample.test_batch_size": 14}),
    "sd3_pickscore_map": ("pickscore", {"pickscore_map": 1.0}, {}),
    "sd3_hpsv2_map": ("pickscore", {"hps_map": 1.0}, {}),
    "sd3_multi_reward_map": ("pickscore", {"pickscore_map": 1.0, "hps_map": 1.0, "clipscore_map": 1.0},
                             {"sample.num_steps": 25, "train.beta": 0.1}),
}


def get_key(config, key):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", sorted(UPSTREAM_RUNS))
def test_named_config_has_upstreams_values(name):
    folder, rewards, overrides = UPSTREAM_RUNS[name]
    config = named(name)
    expected = {**UPSTREAM_COMMON, **overrides}
    mismatches = {k: (get_key(config, k), v) for k, v in expected.items() if get_key(config, k) != v}
    assert not mismatches, f"{name}: ours vs upstream {mismatches}"
    assert dict(config.reward_fn) == rewards and dict(config.eval_reward_fn) == rewards
    assert Path(config.dataset.train).parent.name == folder == Path(config.dataset.test).parent.name
    assert config.train.scalar_mode == (name == "sd3_scalar_baseline")


def test_upstream_multi_reward_recipe_and_our_semantic_variant_differ_only_in_the_rewards():
    upstream, ours = named("sd3_multi_reward_map"), named("sd3_multi_semantic_map")
    assert dict(ours.reward_fn) == {"pickscore_map": 1.0, "clipscore_map": 1.0, "semantic_relative_map": 1.0}
    for key in ("sample.num_steps", "train.beta", "train.decay_type", "dataset.train"):
        assert get_key(ours, key) == get_key(upstream, key)


# ---- evaluation schedule ----

def test_evaluation_schedule_is_upstreams_every_10_epochs_from_epoch_0():
    due = [n for n in range(0, 31) if evaluation_due(n, 10, num_epochs=100000)]
    assert due == [0, 10, 20, 30]
    # upstream evaluates at the start of epoch e when e % eval_freq == 0, i.e. after e completed epochs
    assert due == [e for e in range(0, 31) if e % 10 == 0]


def test_evaluation_schedule_edge_cases():
    assert evaluation_due(7, 5, num_epochs=7)            # after the last epoch
    assert not evaluation_due(0, 5, 7, eval_at_start=False)
    assert not any(evaluation_due(n, 0, 7) for n in range(8))  # eval_freq 0 = never
    with pytest.raises(ValueError, match="completed_epochs"):
        evaluation_due(-1, 5, 7)


# ---- upstream keys on the command line ----

def test_upstream_only_keys_name_the_key_to_use_instead():
    errors, notes = upstream_override_problems(
        ["--config", "config/u_nft.py:tiny", "--config.beta=0.1", "--config.decay_type", "2",
         "--config.sample.num_batches_per_epoch=4", "--config.use_lora=True", "--config.reward_fn.ocr=1.0",
         "--config.train.gradient_accumulation_steps=8", "--config.train.learning_rate=1e-4",
         "--config.dataset.train=x.txt", "--config.dataset=dataset/ocr", "--config.train.beta=0.1"])
    assert errors == [
        "--config.beta=0.1: upstream DiffusionNFT's config.beta is --config.train.beta",
        "--config.decay_type: upstream DiffusionNFT's config.decay_type is --config.train.decay_type",
        "--config.sample.num_batches_per_epoch=4: upstream DiffusionNFT's config.sample.num_batches_per_epoch is "
        "derived here; set --config.sample.num_groups (" + UPSTREAM_KEYS["sample.num_batches_per_epoch"].note + ")",
        "--config.use_lora=True: upstream DiffusionNFT's config.use_lora has no counterpart here: "
        + UPSTREAM_KEYS["use_lora"].note,
        "--config.reward_fn.ocr=1.0: 'ocr' is upstream DiffusionNFT's scorer name; use --config.reward_fn.ocr_map=WEIGHT",
        "--config.train.gradient_accumulation_steps=8: upstream DiffusionNFT's config.train.gradient_accumulation_steps "
        "is derived here; set --config.train.gradient_step_per_epoch ("
        + UPSTREAM_KEYS["train.gradient_accumulation_steps"].note + ")",
        "--config.dataset=dataset/ocr: upstream DiffusionNFT's config.dataset is --config.dataset.train / "
        "--config.dataset.test (" + UPSTREAM_KEYS["dataset"].note + ")",
    ]
    assert notes == ["--config.train.beta=0.1: " + UPSTREAM_KEYS["train.beta"].note]


def test_upstream_only_keys_do_not_shadow_keys_of_ours():
    from config.base import get_config

    ours = get_config()

    def has(key):
        node = ours
        for part in key.split("."):
            if part not in node:
                return False
            node = node[part]
        return True

    for key, mapping in UPSTREAM_KEYS.items():
        if mapping.kind == "same":
            assert all(has(k.strip()) for k in mapping.ours.split("/")), key
        elif key not in ("dataset", "train.beta"):  # a ConfigDict here / a key of another meaning here
            assert not has(key), f"{key} exists here; the upstream-key check would reject it"
        if mapping.ours and mapping.kind in ("renamed", "derived") and key != "save_dir":
            assert all(has(k.strip()) for k in mapping.ours.split("/")), key
    for ours_name in filter(None, UPSTREAM_REWARD_NAMES.values()):
        assert ours_name in ours.reward_options


def test_parity_doc_lists_every_upstream_key():
    doc = (REPO / "docs" / "upstream_parity.md").read_text()
    missing = [key for key in UPSTREAM_KEYS if f"`{key}`" not in doc]
    assert not missing


def test_train_script_rejects_an_upstream_key_before_loading_anything():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_u_nft_sd3.py"), "--config",
                           "config/u_nft.py:tiny", "--config.beta=0.1", "--config.train.lora_path=/x"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1
    assert "error: --config.beta=0.1: upstream DiffusionNFT's config.beta is --config.train.beta" in proc.stderr
    assert "error: --config.train.lora_path=/x: upstream DiffusionNFT's config.train.lora_path is " \
           "--config.lora.init_path" in proc.stderr
    assert "docs/upstream_parity.md" in proc.stderr


# ---- diagnostics ----

def upstream_zero_std_and_top_means(prompts, rewards, top):
    """flow_grpo/stat_tracking.py get_mean_of_top_rewards and train_nft_sd3.py calculate_zero_std_ratio."""
    import numpy as np

    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    groups = [rewards[prompts == p] for p in np.unique(prompts)]
    stds = np.array([np.std(g) for g in groups])
    tops = []
    for g in groups:
        threshold = np.percentile(g, 100 - top)
        tops.append(g.mean() if top == 100 else g[g >= threshold].mean())
    return np.count_nonzero(stds == 0) / len(stds), stds.mean(), np.mean(tops)


def test_group_reward_statistics_match_upstreams_formulas():
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    rewards = [0.1, 0.4, 0.4, 0.9, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.3, 0.2]
    stats = group_reward_statistics(torch.tensor(rewards, dtype=torch.float64), prompts)
    for top in (100, 75, 50, 25, 10):
        zero, std_mean, top_mean = upstream_zero_std_and_top_means(prompts, rewards, top)
        assert stats[f"reward_top{top}_mean"] == pytest.approx(top_mean, rel=1e-12)
    assert stats["zero_std_ratio"] == pytest.approx(1 / 3) == zero
    assert stats["reward_std_mean"] == pytest.approx(std_mean, rel=1e-12)


def test_r_areas_split_locations_into_positive_negative_neutral():
    r = torch.tensor([[[0.9, 0.5, 0.2, 0.5], [0.502, 0.4, 1.0, 0.5005]]])  # 0.5005: within tol
    stats = r_area_statistics(r, tol=1e-3)
    assert stats == pytest.approx({"r_positive_area": 3 / 8, "r_negative_area": 2 / 8, "r_neutral_area": 3 / 8})


def test_policy_statistics_are_upstreams_old_deviate_kl_and_x0_norms():
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, v_ref, x0 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    stats = policy_statistics(v_theta, v_old, x0, v_ref)
    torch.testing.assert_close(stats["old_deviate"], ((v_theta - v_old) ** 2).mean())
    torch.testing.assert_close(stats["old_deviate_max"], ((v_theta - v_old) ** 2).max())
    torch.testing.assert_close(stats["kl_div"], ((v_theta - v_ref) ** 2).mean())
    torch.testing.assert_close(stats["old_kl_div"], ((v_old - v_ref) ** 2).mean())
    torch.testing.assert_close(stats["x0_norm"], (x0 ** 2).mean())
    torch.testing.assert_close(stats["x0_norm_max"], (x0 ** 2).max())
    assert "kl_div" not in policy_statistics(v_theta, v_old, x0)


@pytest.mark.parametrize("key,value,match", [
    ("eval_solver", "heun", r"config.sample.eval_solver must be one of \('flow', 'dpm2', 'dance', 'ddim', 'dpm1'\)"),
    ("eta", 0.7, r"config.sample.solver='dpm2' is deterministic: config.sample.eta must be 0"),
])
def test_solver_keys_are_checked_before_models_load(key, value, match):
    from u_nft.config_utils import ConfigError, validate_config

    config = named("tiny")
    config.sample[key] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, world_size=1)
