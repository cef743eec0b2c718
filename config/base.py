"""Every configuration key, declared once with its default and a one-line comment.

Named experiments live in ``config/u_nft.py`` and change only what differs. Upstream hyper-parameters
are DiffusionNFT's (NVlabs/DiffusionNFT config/nft.py; docs/upstream_facts.md §F).
"""
import os

import ml_collections
from ml_collections import config_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scorer_options():
    """``config.reward_options``: one ConfigDict per registered scorer holding every option of its factory
    with the factory's default (``reward_maps.base.option_defaults``), so each can be set on the command
    line: ``--config.reward_options.pickscore_map.model=/path/to/PickScore_v1``. Options of one plain type
    parse as that type; options that take several (``str | None``, sizes, region lists) accept any Python
    literal (``--config.reward_options.ocr_map.map_size='(32, 32)'``), other text as a string. Only the
    options of the scorers in ``reward_fn`` / ``eval_reward_fn`` reach factories."""
    from reward_maps.base import option_defaults, registered_names

    options = ml_collections.ConfigDict(allow_dotted_keys=True)  # plug-ins: "package.module:callable" keys
    for name in registered_names():
        options[name] = ml_collections.ConfigDict({
            option: default if value_type is not None else config_dict.FieldReference(default, field_type=object)
            for option, (default, value_type) in option_defaults(name).items()
        })
    return options


def get_config():
    config = ml_collections.ConfigDict()

    # ---- run ----
    config.run_name = ""                  # run folder name under logdir; "" = a timestamped name
    config.logdir = os.path.join(REPO_ROOT, "runs")  # parent folder of run folders
    config.seed = 42                      # seeds prompts, noise, timesteps (per rank offsets are derived)
    config.num_epochs = 100000            # epochs of (sample -> score -> train)
    config.save_freq = 30                 # save a checkpoint every N epochs (0 = only at the end)
    config.eval_freq = 10                 # evaluate every N epochs (0 = never), and after the last (upstream: 10)
    config.eval_at_start = True           # also evaluate the base model before the first update (upstream: epoch 0)
    config.checkpoints_total_limit = 5    # keep the newest N checkpoints
    config.resume_from = ""               # checkpoint dir, or run dir (-> its latest checkpoint); "" = fresh
    config.mixed_precision = "fp16"       # "no" | "fp16" | "bf16": autocast dtype of the trained forward
    config.base_dtype = "auto"            # frozen weights: "auto" (the autocast dtype on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    config.allow_tf32 = True              # TF32 matmuls on Ampere+
    config.device = "auto"                # "auto" (cuda if available) | "cpu" | "cuda"
    config.dist_timeout_s = 1800.0        # a collective waiting longer for a dead / stuck rank ends the job (all ranks)

    # ---- pretrained model ----
    config.pretrained = pretrained = ml_collections.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-3.5-medium"  # hub id or local dir of a diffusers pipeline; its model_index.json names the family
    pretrained.build_tiny_if_missing = False  # build the offline tiny pipeline of `tiny_family` at `model` if absent
    pretrained.tiny_family = "sd3"        # which tiny pipeline that builds: "sd3" | "flux" | "qwen_image"

    # ---- LoRA ----
    config.lora = lora = ml_collections.ConfigDict()
    lora.rank = 32                        # LoRA rank r
    lora.alpha = 64                       # LoRA alpha (scale alpha / r)
    lora.init = "gaussian"                # peft init_lora_weights
    lora.target_modules = ()              # layers to adapt (a tuple); () = the family's default (SD3: the 8 attention projections of the joint blocks, as upstream)
    lora.init_path = ""                   # optional diffusers-format LoRA to start from

    # ---- prompts ----
    config.dataset = dataset = ml_collections.ConfigDict()
    dataset.train = os.path.join(REPO_ROOT, "dataset", "ocr", "train.txt")  # .txt (a prompt per line) or .jsonl
    dataset.test = os.path.join(REPO_ROOT, "dataset", "ocr", "test.txt")    # evaluation prompts
    dataset.max_test_prompts = 0          # evaluate on the first N test prompts (0 = all)

    # ---- sampling (rollouts with the old policy) ----
    config.sample = sample = ml_collections.ConfigDict()
    sample.resolution = 512               # image side in pixels
    sample.num_steps = 10                 # solver steps for training rollouts
    sample.eval_num_steps = 40            # solver steps for evaluation
    sample.eval_solver = "flow"           # evaluation solver, deterministic (eta 0): "flow" = Euler (upstream) | any sample.solver
    sample.solver = "dpm2"                # "dpm2" (DPM-Solver++ 2M, upstream) | "dpm1" | "flow" (Euler / SDE with eta)
                                          # | "ddim" (eta <= 1) | "dance" (DanceGRPO SDE); upstream solver.py's five
    sample.eta = 0.0                      # SDE noise level of the "flow" solver (0 = deterministic)
    sample.guidance_scale = 1.0           # CFG scale for training rollouts (1.0 = CFG-free, upstream)
    sample.eval_guidance_scale = 1.0      # CFG scale for evaluation
    sample.distilled_guidance = 3.5       # guidance value fed to guidance-distilled transformers (FLUX.1-dev; diffusers FluxPipeline default 3.5); others ignore it
    sample.max_sequence_length = 128      # T5 tokens (upstream NFT)
    sample.train_batch_size = 9           # images per rank per sampling batch
    sample.test_batch_size = 16           # images per rank per evaluation batch
    sample.num_image_per_prompt = 24      # K: images per prompt group
    sample.num_groups = 48                # prompt groups per epoch (all ranks together)

    # ---- training ----
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 9                  # latents per rank per training micro-batch
    train.gradient_step_per_epoch = 1     # optimizer steps per epoch (accumulation is derived)
    train.num_inner_epochs = 1            # passes over the epoch's samples
    train.timestep_fraction = 0.99        # train on int(num_steps * fraction) of the sampler's timesteps
    train.learning_rate = 3e-4            # AdamW
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 1e-4
    train.adam_epsilon = 1e-8
    train.max_grad_norm = 1.0             # gradient clipping
    train.beta = 1.0                      # implicit-policy strength beta (upstream config.beta)
    train.kl_weight = 1e-4                # weight of mean (v_theta - v_ref)^2 (upstream config.train.beta)
    train.adv_clip_max = 5.0              # advantage clip c; r = 1/2 + 1/2 clip(A / c) and loss scale
    train.adv_mode = "all"                # upstream loss variant per location: "all" | "positive_only" | "negative_only"
                                          # | "one_only" | "binary" (u_nft/loss.py apply_adv_mode)
    train.adaptive_weighting = "sample"   # x0-error normaliser: "sample" (upstream) | "location" | "none"
    train.neutral_anchor_weight = 0.0     # optional pull of neutral cells (r = 1/2) toward v_ref, weight 1 - |2r - 1|
                                          # (u_nft/loss.py; 0 = off, the contract's loss exactly)
    train.cell_size = 2                   # location cell in latent pixels (1 = latent cell, 2 = transformer token)
    train.estimator = "exact"             # "exact" expectation over U | "monte_carlo"
    train.num_locations = 64              # m locations per image for "monte_carlo"
    train.proposal = "uniform"            # q(U): "uniform" | "low_reward" | "informative" (with weights p/q)
    train.proposal_mix = 0.1              # q = (1 - mix) q_focus + mix p
    train.score_sampled_cells = True      # monte_carlo + uniform proposal + an occlusion map: draw U before scoring and
                                          # score only the drawn cells (m + 1 scorer images per sample, not |U| + 1)
    train.map_normalization = "group"     # "group" (docs/contract.md §3) | "none" (maps already in [0, 1], e.g. masks)
    train.map_scale = "global"            # Z: "global" (upstream std) | "group" | "location" | "fixed"
    train.map_sigma_min = 1e-2            # floor of the per-location std ("location")
    train.map_fixed_scale = 1.0           # Z / adv_clip_max for "fixed"
    train.scalar_mode = False             # True: broadcast each image's scalar reward (upstream DiffusionNFT)
    train.decay_type = 1                  # old-policy EMA schedule 0 | 1 | 2 (docs/upstream_facts.md §F)
    train.ema = True                      # EMA of the trained LoRA for evaluation and export
    train.gradient_checkpointing = False  # trade compute for memory in the transformer
    train.compile = "off"                 # whole-model torch.compile of the trained, merged-old and reference forwards:
                                          # "off" (until measured on a GPU) | "auto" (on for CUDA, eager on CPU) | "on"
    train.old_policy = "auto"             # v_old and rollouts: "adapter" (LoRA "old") | "merged" (a copy with the
                                          # old LoRA merged, re-merged after each update) | "auto" (merged on GPU)
    train.sharding = "ddp"                # how ranks hold the model (u_nft/sharding.py): "ddp" (a replica per rank,
                                          # gradients all-reduced) | "fsdp" (FSDP2 fully_shard per transformer block:
                                          # weights, LoRA, EMA and Adam sharded over ranks; old policy = the "old"
                                          # adapter; sharded checkpoints). fsdp when a replica does not fit:
                                          # SD3.5-L, FLUX.1, Qwen-Image on 80 GB (docs/memory_plan.md)
    train.fsdp_text_encoders = "auto"     # under fsdp, also shard frozen text encoders: "auto" (>= 1 B parameters:
                                          # T5-XXL, Qwen2.5-VL) | "all" | "none"

    # ---- rewards ----
    config.reward_fn = ml_collections.ConfigDict({"ocr_map": 1.0})  # name -> weight (weighted sum); "pkg.mod:fn" for your own
    config.reward_options = scorer_options()  # name -> that scorer's factory options (see scorer_options)
    config.eval_reward_fn = ml_collections.ConfigDict({"ocr_map": 1.0})  # rewards reported at evaluation
    config.reward_workers = 4             # threads that score chunks of a batch while the next batch samples
    config.reward_timeout_s = 600.0       # a scorer call running longer fails, naming scorer and batch (0 = no limit)

    # ---- logging ----
    config.logging = logging = ml_collections.ConfigDict()
    logging.wandb_mode = "offline"        # "offline" | "online" | "disabled"
    logging.wandb_project = "u-diffusionnft"
    logging.num_log_images = 8            # images (with reward-map heatmaps) logged per epoch
    logging.image_every = 1               # write image grids every N epochs

    return config
