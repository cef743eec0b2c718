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


def objective_centre(config):
    """One centre box towards red, neutral outside (the tiny default's reward, unchanged)."""
    return _reward(config, "region_color_map", {"regions": TINY_REGIONS})


def objective_quadrants(config):
    """Four quadrants, each towards its own colour: independent regions where credit assignment matters."""
    return _reward(config, "region_color_map", {"regions": QUADRANT_REGIONS})


def objective_global(config):
    """Control: the image-mean colour towards orange, broadcast as a constant map (dense == scalar)."""
    return _reward(config, GLOBAL_SCORER, {"color": GLOBAL_COLOR})


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


def experiment(objective, method):
    """The tiny default with ``objective``'s reward and ``method``'s estimator; run name ``OBJECTIVE_METHOD``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; defined in config/experiments.py: {', '.join(OBJECTIVES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; defined in config/experiments.py: {', '.join(METHODS)}")
    config = METHODS[method](OBJECTIVES[objective](tiny()))
    config.run_name = f"{objective}_{method}"
    config.logging.wandb_mode = "disabled"
    return config


def _named(objective, method):
    def make():
        return experiment(objective, method)

    make.__name__ = f"{objective}_{method}"
    make.__doc__ = f"{OBJECTIVES[objective].__doc__} -- {METHODS[method].__doc__}"
    return make


EXPERIMENTS = {f"{o}_{m}": _named(o, m) for o in OBJECTIVES for m in METHODS}
globals().update(EXPERIMENTS)  # importable by name, e.g. experiments.quadrants_dense()


def get_config(name):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; defined in config/experiments.py: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
