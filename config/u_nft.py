"""Named experiments: ``--config config/u_nft.py:NAME``. Each changes only what differs from its parent.

Upstream values (NVlabs/DiffusionNFT config/nft.py): 8 GPUs, 48 groups x 24 images per epoch,
10 sampling steps, dpm2, CFG-free, LoRA r=32/alpha=64, AdamW 3e-4, KL weight 1e-4, adv_clip_max 5;
evaluation every 10 epochs from epoch 0 with deterministic Euler, 40 steps. The ``sd3_*`` configs
mirror upstream's sd3_ocr, sd3_geneval, sd3_pickscore, sd3_hpsv2 and sd3_multi_reward key by key;
docs/upstream_parity.md lists every key, both values, and why where they differ.
"""
import importlib.util
import os

import ml_collections


def _load_sibling(name):
    # Config files are loaded by path (ml_collections), not as a package: import base.py beside this file.
    spec = importlib.util.spec_from_file_location(f"u_nft_config_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_base = _load_sibling("base")
REPO_ROOT, base_config = _base.REPO_ROOT, _base.get_config

DATASET_ROOT = os.path.join(REPO_ROOT, "dataset")


def _dataset(config, name, train="train.txt", test="test.txt"):
    config.dataset.train = os.path.join(DATASET_ROOT, name, train)
    config.dataset.test = os.path.join(DATASET_ROOT, name, test)
    return config


def single_reward(config, name, options=None):
    """Train and evaluate on the one scorer ``name`` (weight 1), with factory ``options`` if given."""
    # allow_dotted_keys: a plug-in's name is "package.module:callable"
    config.reward_fn = ml_collections.ConfigDict({name: 1.0}, allow_dotted_keys=True)
    config.eval_reward_fn = ml_collections.ConfigDict({name: 1.0}, allow_dotted_keys=True)
    if options is not None:  # set only these options: the others keep their declared defaults
        if name in config.reward_options:
            config.reward_options[name].update(options)
        else:  # a plug-in scorer ("package.module:callable") declares its options here
            config.reward_options[name] = ml_collections.ConfigDict(options)
    return config


def sd3_ocr_map():
    """OCR with the dense OCR map (RapidOCR); upstream sd3_ocr: 2 optimizer steps per epoch, decay type 2,
    beta 0.1 (on 8 ranks the old-policy decay ramp starts after epoch 37, at optimizer step 76)."""
    config = _dataset(base_config(), "ocr")
    config.run_name = "sd3_ocr_map"
    single_reward(config, "ocr_map")
    config.train.gradient_step_per_epoch = 2
    config.train.decay_type = 2
    config.train.beta = 0.1
    return config


def sd3_scalar_baseline():
    """Upstream DiffusionNFT on OCR: the same run with each image's scalar reward broadcast."""
    config = sd3_ocr_map()
    config.run_name = "sd3_scalar_baseline"
    config.train.scalar_mode = True
    return config


def sd3_geneval_map():
    """GenEval compositional prompts (jsonl with metadata) with the per-object GenEval map."""
    config = _dataset(base_config(), "geneval", "train_metadata.jsonl", "test_metadata.jsonl")
    config.run_name = "sd3_geneval_map"
    single_reward(config, "geneval_map")
    config.sample.test_batch_size = 14  # upstream sd3_geneval (2212 test images; no effect on scores here)
    return config


def sd3_pickscore_map():
    """Human preference (PickScore) with the patch-text similarity map."""
    config = _dataset(base_config(), "pickscore")
    config.run_name = "sd3_pickscore_map"
    single_reward(config, "pickscore_map")
    return config


def sd3_hpsv2_map():
    """Human preference (HPS v2.1) on the PickScore prompts with the patch-text similarity map (upstream sd3_hpsv2)."""
    config = _dataset(base_config(), "pickscore")
    config.run_name = "sd3_hpsv2_map"
    single_reward(config, "hps_map")
    return config


def sd3_multi_reward_map():
    """Upstream sd3_multi_reward: PickScore + HPS v2.1 + CLIPScore (weights 1, summed; evaluated on the same
    three), PickScore prompts, 25 sampling steps, beta 0.1."""
    config = sd3_pickscore_map()
    config.run_name = "sd3_multi_reward_map"
    rewards = {"pickscore_map": 1.0, "hps_map": 1.0, "clipscore_map": 1.0}
    config.reward_fn = ml_collections.ConfigDict(rewards)
    config.eval_reward_fn = ml_collections.ConfigDict(rewards)
    config.sample.num_steps = 25
    config.train.beta = 0.1
    return config


def sd3_multi_semantic_map():
    """Our variant of the multi-reward run: HPS replaced by the semantic-relative map ("realistic photo" minus
    "CG render", bias-cancelling, needs no HPS weights); evaluated on PickScore + CLIPScore."""
    config = sd3_multi_reward_map()
    config.run_name = "sd3_multi_semantic_map"
    config.reward_fn = ml_collections.ConfigDict({"pickscore_map": 1.0, "clipscore_map": 1.0,
                                                  "semantic_relative_map": 1.0})
    config.eval_reward_fn = ml_collections.ConfigDict({"pickscore_map": 1.0, "clipscore_map": 1.0})
    return config


def sd3_custom_mask():
    """A user's mask reward: per-prompt mask files listed in a jsonl ({"prompt": ..., "mask": "file.png"}).
    Masks are already optimality probabilities, so normalization is skipped (docs/theory.md §7)."""
    config = _dataset(base_config(), "masks", "train.jsonl", "test.jsonl")
    config.run_name = "sd3_custom_mask"
    # Mask paths in the jsonl are relative to the dataset folder.
    single_reward(config, "mask_file_map", {"mask_root": os.path.join(DATASET_ROOT, "masks")})
    config.train.map_normalization = "none"
    return config


# A region-colour mask: red inside the centre box, no signal (r = 1/2) outside. The tiny pipeline's
# pretrained transformer samples random quadrant colours; RL has to move the centre towards red.
TINY_REGIONS = ({"box": (0.25, 0.25, 0.75, 0.75), "color": (1.0, 0.1, 0.1)},)


def tiny():
    """The embedded CPU default: the offline tiny SD3 pipeline (built on first use), a region-colour mask."""
    config = base_config()
    config.run_name = "tiny"
    config.device = "cpu"
    config.mixed_precision = "no"
    config.pretrained.model = os.path.join(REPO_ROOT, ".cache", "tiny-sd3")
    config.pretrained.build_tiny_if_missing = True
    config.dataset.train = os.path.join(REPO_ROOT, "config", "prompts", "tiny_train.txt")
    config.dataset.test = os.path.join(REPO_ROOT, "config", "prompts", "tiny_test.txt")
    config.num_epochs = 10
    config.save_freq = 5
    config.eval_freq = 5
    config.lora.rank = 8
    config.lora.alpha = 16
    config.sample.resolution = 64
    config.sample.num_steps = 6
    config.sample.eval_num_steps = 6
    config.sample.max_sequence_length = 32
    config.sample.train_batch_size = 8
    config.sample.test_batch_size = 8
    config.sample.num_image_per_prompt = 4
    config.sample.num_groups = 8
    config.train.batch_size = 8
    config.train.learning_rate = 1e-2
    config.train.gradient_step_per_epoch = 4
    config.train.cell_size = 1
    single_reward(config, "region_color_map", {"regions": TINY_REGIONS})
    config.reward_workers = 1
    config.logging.wandb_mode = "offline"
    return config


def tiny_scalar():
    """The tiny default in scalar mode (upstream DiffusionNFT), for comparisons."""
    config = tiny()
    config.run_name = "tiny_scalar"
    config.train.scalar_mode = True
    return config


def get_config(name):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; defined in config/u_nft.py: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]()


EXPERIMENTS = {f.__name__: f for f in (sd3_ocr_map, sd3_scalar_baseline, sd3_geneval_map, sd3_pickscore_map,
                                        sd3_hpsv2_map, sd3_multi_reward_map, sd3_multi_semantic_map, sd3_custom_mask,
                                        tiny, tiny_scalar)}
