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


# ---- FLUX.1-dev (u_nft/models/flux.py; every value and its source: docs/flux.md) ----
FLUX_MODEL = "black-forest-labs/FLUX.1-dev"


def flux_recipe(config):
    """FLUX.1-dev RL as Flow-Factory's NFT-on-FLUX recipe (X-GenGroup/Flow-Factory examples/nft/lora/flux1)
    and Flow-GRPO's FLUX configs (yifan123/flow_grpo config/grpo.py pickscore_flux, scripts/train_flux.py)
    set it up: distilled guidance 3.5 and no CFG, LoRA r=64 / alpha=128 on the family's default targets
    (double-stream attention + FFNs, single-stream attention), 8 ODE steps at 512 px, 28 evaluation steps,
    KL weight 0, nft beta 1, bf16. Keys not set here keep DiffusionNFT's values (config/base.py)."""
    config.pretrained.model = FLUX_MODEL
    config.mixed_precision = "bf16"
    config.lora.rank = 64
    config.lora.alpha = 128
    config.lora.target_modules = ()  # u_nft.models.flux.DEFAULT_LORA_TARGETS
    config.sample.resolution = 512
    config.sample.num_steps = 8
    config.sample.eval_num_steps = 28
    config.sample.guidance_scale = 1.0  # guidance-distilled: no CFG (validated at start-up)
    config.sample.eval_guidance_scale = 1.0
    config.sample.distilled_guidance = 3.5
    config.sample.train_batch_size = 3
    config.train.batch_size = 3
    config.train.beta = 1.0
    config.train.kl_weight = 0.0
    # A DDP replica with the merged old policy at batch 3 is predicted at 66.8 GiB per 80 GB card (7.7 GiB
    # free); checkpointing brings it to 47.2 GiB (docs/memory_plan.md). Turn it off where memory allows.
    config.train.gradient_checkpointing = True
    return config


def flux_ocr_map():
    """OCR on FLUX.1-dev with the dense OCR map (RapidOCR)."""
    config = flux_recipe(_dataset(base_config(), "ocr"))
    config.run_name = "flux_ocr_map"
    single_reward(config, "ocr_map")
    return config


def flux_scalar_baseline():
    """DiffusionNFT on FLUX.1-dev: the OCR run with each image's scalar reward broadcast."""
    config = flux_ocr_map()
    config.run_name = "flux_scalar_baseline"
    config.train.scalar_mode = True
    return config


def flux_geneval_map():
    """GenEval compositional prompts on FLUX.1-dev with the per-object GenEval map."""
    config = flux_recipe(_dataset(base_config(), "geneval", "train_metadata.jsonl", "test_metadata.jsonl"))
    config.run_name = "flux_geneval_map"
    single_reward(config, "geneval_map")
    config.sample.test_batch_size = 14  # as sd3_geneval_map
    return config


def flux_pickscore_map():
    """Human preference (PickScore) on FLUX.1-dev with the patch-text similarity map (Flow-GRPO pickscore_flux,
    Flow-Factory's NFT FLUX example: both train FLUX on PickScore)."""
    config = flux_recipe(_dataset(base_config(), "pickscore"))
    config.run_name = "flux_pickscore_map"
    single_reward(config, "pickscore_map")
    return config


def flux_tiny():
    """The offline CPU default on FLUX: the tiny FLUX.1-dev-shaped pipeline (u_nft/tiny_flux.py, built on first
    use), the tiny SD3 default's region-colour mask and budget, FLUX's distilled guidance and LoRA targets."""
    config = tiny()
    config.run_name = "flux_tiny"
    config.pretrained.model = os.path.join(REPO_ROOT, ".cache", "tiny-flux")
    config.pretrained.tiny_family = "flux"
    config.lora.target_modules = ()  # u_nft.models.flux.DEFAULT_LORA_TARGETS
    config.sample.distilled_guidance = 3.5
    return config


# ---- Qwen-Image (u_nft/models/qwen_image.py, diffusers >= 0.35; every value and its source: docs/qwen_image.md) ----
QWEN_IMAGE_MODEL = "Qwen/Qwen-Image"


def qwen_image_recipe(config):
    """Qwen-Image RL as Flow-GRPO (yifan123/flow_grpo config/grpo.py pickscore_qwenimage, scripts/train_qwenimage.py)
    and Flow-Factory's NFT-on-Qwen-Image example (X-GenGroup/Flow-Factory examples/nft/lora/qwen_image) set it up:
    LoRA r=64 / alpha=128 on the family's default targets, 512 px, 10 rollout steps, 16 images per prompt and 32
    prompt groups per epoch, 4 images per GPU, KL weight 0, nft beta 1, AdamW 2e-4, bf16, gradient checkpointing,
    and the model sharded (20 B parameters do not fit as replicas with a merged old policy on 80 GB). Rollouts and
    evaluation stay CFG-free as DiffusionNFT (both peers sample with true CFG 4.0: sample.guidance_scale=4.0)."""
    config.pretrained.model = QWEN_IMAGE_MODEL
    config.mixed_precision = "bf16"
    config.lora.rank = 64
    config.lora.alpha = 128
    config.lora.target_modules = ()  # u_nft.models.qwen_image.DEFAULT_LORA_TARGETS
    config.sample.resolution = 512
    config.sample.num_steps = 10
    config.sample.eval_num_steps = 40
    config.sample.guidance_scale = 1.0
    config.sample.eval_guidance_scale = 1.0
    config.sample.max_sequence_length = 512  # QwenImagePipeline's default (padding is trimmed per batch)
    config.sample.num_image_per_prompt = 16
    config.sample.num_groups = 32
    config.sample.train_batch_size = 4
    config.sample.test_batch_size = 4
    config.train.batch_size = 4
    config.train.beta = 1.0
    config.train.kl_weight = 0.0
    config.train.learning_rate = 2e-4
    config.train.gradient_checkpointing = True
    config.train.sharding = "fsdp"
    return config


def qwen_image_ocr_map():
    """OCR on Qwen-Image with the dense OCR map (RapidOCR)."""
    config = qwen_image_recipe(_dataset(base_config(), "ocr"))
    config.run_name = "qwen_image_ocr_map"
    single_reward(config, "ocr_map")
    return config


def qwen_image_scalar_baseline():
    """DiffusionNFT on Qwen-Image: the OCR run with each image's scalar reward broadcast."""
    config = qwen_image_ocr_map()
    config.run_name = "qwen_image_scalar_baseline"
    config.train.scalar_mode = True
    return config


def qwen_image_tiny():
    """The offline CPU default on Qwen-Image: the tiny Qwen-Image pipeline (u_nft/tiny_qwen_image.py, built on
    first use), the tiny SD3 default's region-colour mask and budget, Qwen-Image's LoRA targets."""
    config = tiny()
    config.run_name = "qwen_image_tiny"
    config.pretrained.model = os.path.join(REPO_ROOT, ".cache", "tiny-qwen-image")
    config.pretrained.tiny_family = "qwen_image"
    config.lora.target_modules = ()  # u_nft.models.qwen_image.DEFAULT_LORA_TARGETS
    return config


def get_config(name):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; defined in config/u_nft.py: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]()


EXPERIMENTS = {f.__name__: f for f in (sd3_ocr_map, sd3_scalar_baseline, sd3_geneval_map, sd3_pickscore_map,
                                        sd3_hpsv2_map, sd3_multi_reward_map, sd3_multi_semantic_map, sd3_custom_mask,
                                        tiny, tiny_scalar,
                                        flux_tiny, flux_ocr_map, flux_scalar_baseline, flux_geneval_map,
                                        flux_pickscore_map,
                                        qwen_image_tiny, qwen_image_ocr_map, qwen_image_scalar_baseline)}
