"""Dense maps vs scalar rewards (issue 8): one named config per (objective, method), ``OBJECTIVE_METHOD``.

    python scripts/train_u_nft_sd3.py --config config/experiments.py:quadrants_dense
    python scripts/dense_vs_scalar.py          # the whole grid, seeds, plots and table (docs/dense_vs_scalar.md)

Every config starts from ``config/u_nft.py:tiny`` (the offline tiny SD3 pipeline, 64 px, 8 groups x 4
images and 4 optimizer steps per epoch) and changes only the reward (the objective) and how the map
reaches the loss (the method). All methods see the same rollouts and take the same optimizer steps.

Objectives (``OBJECTIVES``):
  centre     one centre box must turn red, no signal elsewhere (the tiny default; localized)
  quadrants  four quadrants, each with its own target colour (localized, independent regions: a
             scalar reward mixes four independent outcomes into one number)
  global     control: the whole image's MEAN colour must be orange, and the map is that one number
             broadcast (constant per image), so dense and scalar are the same loss by construction
  layout     prompt-conditioned (issue 17; not in the issue-8 grid): each prompt's metadata holds its own
             two boxes and colours ("red on the left, blue on the right" and the swapped twin of every
             prompt, config/prompts/layout_{train,test}.jsonl), so no fixed layout satisfies the set and
             the policy must read the prompt; scalar = the mean over the two equal-area regions (a
             GenEval-style partial score), dense = the per-region map, neutral between and around them
Methods (``METHODS``):
  dense      U-NFT, exact expectation over all 8 x 8 latent cells
  scalar     upstream DiffusionNFT: each image's scalar (the map's mean over region pixels) broadcast
  mc_uniform U-NFT, Monte Carlo over m = 8 cells per image, q = p uniform
  mc_focus   U-NFT, Monte Carlo over m = 8 cells, q focused on low-reward cells, weights p / q
"""
import importlib.util
import os


def _load_sibling(name):
    # Config files are loaded by path (ml_collections), not as a package: import u_nft.py beside this file.
    spec = importlib.util.spec_from_file_location(f"u_nft_config_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_u_nft = _load_sibling("u_nft")
tiny, TINY_REGIONS, _reward = _u_nft.tiny, _u_nft.TINY_REGIONS, _u_nft.single_reward

# Four independent regions with their own targets: the tiny model paints each quadrant a random colour.
QUADRANT_REGIONS = (  # tuples, as every list-valued config value (ml_collections overrides tuples)
    {"box": (0.0, 0.0, 0.5, 0.5), "color": (1.0, 0.1, 0.1)},   # top left: red
    {"box": (0.5, 0.0, 1.0, 0.5), "color": (0.1, 0.8, 0.1)},   # top right: green
    {"box": (0.0, 0.5, 0.5, 1.0), "color": (0.1, 0.2, 1.0)},   # bottom left: blue
    {"box": (0.5, 0.5, 1.0, 1.0), "color": (1.0, 0.9, 0.1)},   # bottom right: yellow
)
GLOBAL_COLOR = (1.0, 0.6, 0.1)  # orange, for the image-mean control
# The control scorer lives in scripts/dense_vs_scalar.py; the train script's folder (scripts/) is on
# sys.path when it runs, so the plug-in name resolves there (reward_maps.base.resolve_factory).
GLOBAL_SCORER = "dense_vs_scalar:global_color_map"
NUM_LOCATIONS = 8  # m cells per image for the Monte-Carlo methods (of 8 x 8 = 64)
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
LAYOUT_TRAIN = os.path.join(PROMPTS_DIR, "layout_train.jsonl")  # 12 subjects x both colour orders
LAYOUT_TEST = os.path.join(PROMPTS_DIR, "layout_test.jsonl")    # 4 held-out subjects x both orders


def objective_centre(config):
    """One centre box towards red, neutral outside (the tiny default's reward, unchanged)."""
    return _reward(config, "region_color_map", {"regions": TINY_REGIONS})


def objective_quadrants(config):
    """Four quadrants, each towards its own colour: independent regions where credit assignment matters."""
    return _reward(config, "region_color_map", {"regions": QUADRANT_REGIONS})


def objective_global(config):
    """Control: the image-mean colour towards orange, broadcast as a constant map (dense == scalar)."""
    return _reward(config, GLOBAL_SCORER, {"color": GLOBAL_COLOR})


def objective_layout(config):
    """Prompt-conditioned: each prompt's regions and colours come from its jsonl metadata (key "regions")."""
    config.dataset.train = LAYOUT_TRAIN
    config.dataset.test = LAYOUT_TEST
    return _reward(config, "region_color_map", {"regions": None, "metadata_key": "regions"})


def method_dense(config):
    """U-NFT with the exact expectation over all locations (the default estimator)."""
    config.train.estimator = "exact"
    return config


def method_scalar(config):
    """Upstream DiffusionNFT: each image's scalar reward broadcast to a constant map."""
    config.train.scalar_mode = True
    return config


def method_mc_uniform(config):
    """U-NFT, Monte Carlo over NUM_LOCATIONS cells drawn uniformly (q = p)."""
    config.train.estimator = "monte_carlo"
    config.train.num_locations = NUM_LOCATIONS
    config.train.proposal = "uniform"
    return config


def method_mc_focus(config):
    """U-NFT, Monte Carlo over NUM_LOCATIONS cells drawn mostly where the reward is low, weighted by p / q."""
    config.train.estimator = "monte_carlo"
    config.train.num_locations = NUM_LOCATIONS
    config.train.proposal = "low_reward"
    return config


OBJECTIVES = {"centre": objective_centre, "quadrants": objective_quadrants, "global": objective_global}
METHODS = {"dense": method_dense, "scalar": method_scalar, "mc_uniform": method_mc_uniform,
           "mc_focus": method_mc_focus}
LOCALIZED = ("centre", "quadrants")  # objectives where dense should win; "global" should tie
# The issue-17 study (scripts/locality_study.py) adds the prompt-conditioned objective; the issue-8 grid
# (scripts/dense_vs_scalar.py) keeps OBJECTIVES, so its documented command reproduces as before.
STUDY_OBJECTIVES = {**OBJECTIVES, "layout": objective_layout}

# LoRA targets of the locality levers (issue 17): the tiny default adapts the joint blocks' attention only.
ATTENTION_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                     "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FF_OUT_TARGETS = ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_out")


def _targets(modules):
    return "lora.target_modules=(" + ", ".join(repr(m) for m in modules) + ",)"


# Variants: command-line overrides (--config.KEY=VALUE, exactly as printed in the study's reproduce
# commands) applied on top of OBJECTIVE_METHOD. "base" is the config as defined above.
VARIANTS = {
    "base": (),
    # locality levers
    "anchor1": ("train.neutral_anchor_weight=1.0",),
    "anchor10": ("train.neutral_anchor_weight=10.0",),
    "ff_out": (_targets(FF_OUT_TARGETS),),
    "ff_out_r32": (_targets(FF_OUT_TARGETS), "lora.rank=32", "lora.alpha=64"),
    "ff_out_r32_anchor10": (_targets(FF_OUT_TARGETS), "lora.rank=32", "lora.alpha=64",
                            "train.neutral_anchor_weight=10.0"),
    "attn_r2": ("lora.rank=2", "lora.alpha=4"),
    "proj_out_only": (_targets(("proj_out",)),),  # per-token output layer only (the kernel diagnostic)
    # ablations (issue 17 item 3)
    "cell2": ("train.cell_size=2",),
    "cell4": ("train.cell_size=4",),
    "beta0.1": ("train.beta=0.1",),
    "scale_group": ("train.map_scale=group",),
    "scale_location": ("train.map_scale=location",),
    "adaptive_location": ("train.adaptive_weighting=location",),
    "m4": ("train.num_locations=4",),
    "m16": ("train.num_locations=16",),
}


def experiment(objective, method):
    """The tiny default with ``objective``'s reward and ``method``'s estimator; run name ``OBJECTIVE_METHOD``."""
    if objective not in STUDY_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; defined in config/experiments.py: {', '.join(STUDY_OBJECTIVES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; defined in config/experiments.py: {', '.join(METHODS)}")
    config = METHODS[method](STUDY_OBJECTIVES[objective](tiny()))
    config.run_name = f"{objective}_{method}"
    config.logging.wandb_mode = "disabled"
    return config


def _named(objective, method):
    def make():
        return experiment(objective, method)

    make.__name__ = f"{objective}_{method}"
    make.__doc__ = f"{STUDY_OBJECTIVES[objective].__doc__} -- {METHODS[method].__doc__}"
    return make


EXPERIMENTS = {f"{o}_{m}": _named(o, m) for o in STUDY_OBJECTIVES for m in METHODS}
globals().update(EXPERIMENTS)  # importable by name, e.g. experiments.quadrants_dense()


def get_config(name):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; defined in config/experiments.py: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
