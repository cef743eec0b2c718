"""Scorer options: factory errors name the real culprit, every registered scorer's options (and list-valued
keys) can be set from the command line, and the train / eval reward sets share scorer instances."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from absl import flags
from ml_collections import config_flags

from reward_maps.base import (RewardMapError, RewardOutput, build_scorer, factory_options, option_defaults,
                              registered_names)
from reward_maps.combine import ScorerCache, train_and_eval_reward_sets

REPO = Path(__file__).resolve().parents[1]
U_NFT_CONFIG = REPO / "config" / "u_nft.py"
PLUGIN = __name__  # pytest imports this module by this name, so "test_scorer_options:fn" resolves


def _load_config(name):
    spec = importlib.util.spec_from_file_location("u_nft_configs_test_options", U_NFT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def _parse(*overrides, config="tiny"):
    """The config as the train script's ``--config`` flag parses it (real ml_collections config_flags)."""
    argv = ["train_u_nft_sd3.py", f"--config={U_NFT_CONFIG}:{config}", *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", f"{U_NFT_CONFIG}:{config}", flag_values=values)
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv, as in the script
    try:
        values(argv)
    finally:
        sys.argv = saved
    return holder.value


# ---- plug-in factories used below ------------------------------------------------------------------

def factory_with_inner_type_error(device="cpu", dtype=torch.float32, size: int = 2):
    """A factory whose own code raises TypeError (a bug inside, not a bad option)."""
    return torch.zeros(size) + "not a number"


BUILT = []  # (name, options) of every counting factory call


def _constant(value):
    def score(images, prompts, metadata):
        b = images.shape[0]
        return RewardOutput(torch.full((b, 2, 2), value), torch.full((b,), value), [{} for _ in range(b)])

    return score


def counting_a(device="cpu", dtype=torch.float32, value: float = 0.25):
    BUILT.append(("a", value))
    return _constant(value)


def counting_b(device="cpu", dtype=torch.float32, value: float = 0.5):
    BUILT.append(("b", value))
    return _constant(value)


def counting_c(device="cpu", dtype=torch.float32, value: float = 0.75):
    BUILT.append(("c", value))
    return _constant(value)


# ---- item 4: errors point at the real culprit ------------------------------------------------------

def test_type_error_inside_a_factory_propagates_naming_the_scorer():
    name = f"{PLUGIN}:factory_with_inner_type_error"
    with pytest.raises(TypeError) as info:
        build_scorer(name, size=3)
    assert not isinstance(info.value, RewardMapError)
    assert "bad options" not in str(info.value)
    if sys.version_info >= (3, 11):
        assert any(name in note for note in info.value.__notes__)


def test_unknown_or_missing_options_are_option_errors_listing_the_accepted_ones():
    with pytest.raises(RewardMapError, match=r"'jpeg_map': bad options \['qualty'\].*accepted options: block, quality, "
                                             r"calibrate"):
        build_scorer("jpeg_map", qualty=90)
    with pytest.raises(RewardMapError, match=r"'occlusion_map': bad options \[\].*'scorer'"):
        build_scorer("occlusion_map")


# ---- item 5: every scorer's options from the command line -------------------------------------------

def test_every_registered_scorer_declares_its_factory_options_with_their_defaults():
    from reward_maps.base import resolve_factory

    options = _load_config("sd3_ocr_map").reward_options
    assert sorted(options) == registered_names()
    for name in registered_names():
        declared = options[name].to_dict()
        params = factory_options(resolve_factory(name))
        assert sorted(declared) == sorted(params), name
        for key, param in params.items():
            default = None if param.default is param.empty else param.default
            assert declared[key] == (tuple(default) if isinstance(default, list) else default), (name, key)
    assert options.pickscore_map.model == "yuvalkirstain/PickScore_v1" and options.jpeg_map.quality == 95
    # one plain type -> typed field; several types (or None) -> any literal
    assert option_defaults("jpeg_map")["quality"] == (95, int)
    assert option_defaults("hps_map")["model"] == (None, None)
    assert option_defaults("occlusion_map")["grid"] == ((4, 4), None)


def test_named_configs_set_only_their_options_and_keep_the_others():
    config = _load_config("tiny")
    region = config.reward_options.region_color_map
    assert region.regions[0]["box"] == (0.25, 0.25, 0.75, 0.75) and region.neutral == 0.5
    assert config.reward_options.pickscore_map.model == "yuvalkirstain/PickScore_v1"
    custom = _load_config("sd3_custom_mask").reward_options.mask_file_map
    assert custom.mask_root.endswith("masks") and custom.binary is True


def test_command_line_sets_scorer_options_of_every_type():
    config = _parse("--config.reward_options.pickscore_map.model=/models/PickScore_v1",
                    "--config.reward_options.hps_map.model=/models/hps_v2.1",          # default None
                    "--config.reward_options.ocr_map.map_size=(32, 32)",                # int | Sequence | None
                    "--config.reward_options.ocr_map.num_workers=2",
                    "--config.reward_options.jpeg_map.quality=80",                      # int
                    "--config.reward_options.jpeg_map.calibrate=false",                 # bool
                    "--config.reward_options.geneval_map.detector=/models/m2f",         # str | PathLike
                    "--config.reward_options.geneval_map.threshold=0.5",                # float
                    "--config.reward_options.pickscore_map.occlusion_fill=0.25",        # str | float
                    "--config.reward_options.region_color_map.regions=({'box': (0, 0, 1, 1), 'color': (0, 1, 0)},)")
    opts = config.reward_options
    assert opts.pickscore_map.model == "/models/PickScore_v1" and opts.hps_map.model == "/models/hps_v2.1"
    assert opts.ocr_map.map_size == (32, 32) and opts.ocr_map.num_workers == 2
    assert opts.jpeg_map.quality == 80 and opts.jpeg_map.calibrate is False
    assert opts.geneval_map.detector == "/models/m2f" and opts.geneval_map.threshold == 0.5
    assert opts.pickscore_map.occlusion_fill == 0.25
    assert opts.region_color_map.regions == ({"box": (0, 0, 1, 1), "color": (0, 1, 0)},)
    scorer = build_scorer("jpeg_map", **opts.jpeg_map.to_dict())  # what the factory receives works
    assert callable(scorer)


def test_list_valued_keys_are_tuples_overridable_both_ways():
    assert isinstance(_load_config("sd3_ocr_map").lora.target_modules, tuple)
    one = _parse("--config.lora.target_modules=('attn.to_q', 'attn.to_v')")
    two = _parse("--config.lora.target_modules=attn.to_q", "--config.lora.target_modules=attn.to_v")
    assert one.lora.target_modules == two.lora.target_modules == ("attn.to_q", "attn.to_v")
    quadrants = importlib.util.spec_from_file_location("exp_test_options", REPO / "config" / "experiments.py")
    module = importlib.util.module_from_spec(quadrants)
    quadrants.loader.exec_module(module)
    assert isinstance(module.QUADRANT_REGIONS, tuple) and isinstance(module.GLOBAL_COLOR, tuple)


def test_reward_option_typos_are_config_errors_naming_the_key():
    from u_nft.config_utils import ConfigError, check_reward_options

    config = _load_config("tiny")
    config.reward_options["pickscore"] = {"model": "x"}
    with pytest.raises(ConfigError, match=r"config.reward_options.pickscore: no such reward scorer"):
        check_reward_options(config)
    config = _load_config("tiny")
    config.reward_options.region_color_map["nuetral"] = 0.2
    with pytest.raises(ConfigError, match=r"config.reward_options.region_color_map: .*'nuetral'.*accepted options: "
                                          r"regions, neutral"):
        check_reward_options(config)
    check_reward_options(_load_config("sd3_multi_semantic_map"))  # every declared default binds


@pytest.mark.slow
def test_train_script_runs_with_scorer_options_and_lora_targets_from_the_command_line(tmp_path, tiny_sd3_dir):
    """The real train script: PickScore pointed at a local (tiny) CLIP dir and LoRA on two projections,
    both only from the command line; the checkpoint holds exactly those LoRA targets."""
    from u_nft.checkpoint import load_checkpoint
    from u_nft.tiny_models import build_tiny_clip
    from test_train_e2e import run_script, small_run_args

    clip = build_tiny_clip(tmp_path / "clip")
    args = small_run_args(tmp_path / "runs", tiny_sd3_dir, "opts", epochs=1) + [
        "--config.eval_freq=1", "--config.eval_reward_fn={'pickscore_map': 1.0}",
        f"--config.reward_options.pickscore_map.model={clip}", f"--config.reward_options.pickscore_map.processor={clip}",
        "--config.lora.target_modules=attn.to_q", "--config.lora.target_modules=attn.to_v"]
    proc = run_script(args)
    evals = [line for line in proc.stdout.splitlines() if line.startswith("eval after")]
    assert evals and all("pickscore_map" in line for line in evals)
    ckpt = load_checkpoint(tmp_path / "runs" / "opts" / "checkpoints" / "checkpoint-1")
    targets = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in ckpt.tensors["lora_default"]}
    assert targets == {"to_q", "to_v"}
    assert ckpt.config["reward_options"]["pickscore_map"]["model"] == str(clip)
    assert ckpt.config["lora"]["target_modules"] == ["attn.to_q", "attn.to_v"]


# ---- item 6: one instance of each scorer ---------------------------------------------------------

def test_train_and_eval_sets_build_each_scorer_once():
    """sd3_multi_semantic_map's shape: three train scorers, two of them also evaluated -> three factory calls, not five."""
    BUILT.clear()
    a, b, c = (f"{PLUGIN}:counting_{x}" for x in "abc")
    options = {a: {"value": 0.1}, b: {}, c: {}, "pickscore_map": {"model": "unused"}}  # unused: never built
    train, evaluate = train_and_eval_reward_sets({a: 1.0, b: 1.0, c: 1.0}, {a: 1.0, b: 1.0}, options)
    with train, evaluate:
        assert sorted(BUILT) == [("a", 0.1), ("b", 0.5), ("c", 0.75)]
        assert train.scorers[a] is evaluate.scorers[a] and train.scorers[b] is evaluate.scorers[b]
        images = torch.rand(2, 3, 8, 8)
        assert float(evaluate(images, ["p", "q"], [{}, {}])[a].scores[0]) == pytest.approx(0.1)


def test_scorers_with_different_options_are_separate_instances():
    BUILT.clear()
    cache = ScorerCache()
    name = f"{PLUGIN}:counting_a"
    first = cache.get(name, {"value": 0.1}, "cpu", torch.float32)
    assert cache.get(name, {"value": 0.1}, "cpu", torch.float32) is first
    assert cache.get(name, {"value": 0.2}, "cpu", torch.float32) is not first
    assert cache.get(name, {}, "cpu", torch.float32) is not first
    assert len(cache) == 3 and [v for _, v in BUILT] == [0.1, 0.2, 0.25]
    # options compare by value: tuples equal lists, key order does not matter
    assert ScorerCache.key("x", {"a": (1, 2), "b": 0}, "cpu", torch.float32) == \
        ScorerCache.key("x", {"b": 0, "a": [1, 2]}, "cpu", torch.float32)


def test_multi_map_config_shares_its_clip_scorers_between_train_and_eval(tmp_path):
    """config/u_nft.py:sd3_multi_semantic_map with its models pointed at a tiny CLIP: PickScore and CLIPScore are one
    instance each across the two sets."""
    from u_nft.tiny_models import build_tiny_clip

    clip = str(build_tiny_clip(tmp_path / "clip"))
    config = _load_config("sd3_multi_semantic_map")
    for name in ("pickscore_map", "clipscore_map", "semantic_relative_map"):
        config.reward_options[name].model = clip
        config.reward_options[name].processor = clip
    train, evaluate = train_and_eval_reward_sets(dict(config.reward_fn), dict(config.eval_reward_fn),
                                                 config.reward_options.to_dict())
    with train, evaluate:
        assert sorted(train.scorers) == ["clipscore_map", "pickscore_map", "semantic_relative_map"]
        for name in ("pickscore_map", "clipscore_map"):
            assert evaluate.scorers[name] is train.scorers[name]
        out = evaluate(torch.rand(1, 3, 64, 64), ["a cat"], [{}])
        assert out["pickscore_map"].maps.shape[0] == 1


def test_dotted_plug_in_name_from_the_custom_rewards_doc_configures_and_scores():
    """docs/custom_rewards.md: a plug-in named "package.module:callable" in reward_fn and reward_options."""
    import ml_collections

    from u_nft.config_utils import check_reward_options

    config = _load_config("tiny")
    name = "reward_maps.examples:center_mask"
    config.reward_fn = ml_collections.ConfigDict({name: 1.0}, allow_dotted_keys=True)
    config.reward_options[name] = ml_collections.ConfigDict({"size": 0.6})
    check_reward_options(config)
    train, evaluate = train_and_eval_reward_sets(dict(config.reward_fn), dict(config.eval_reward_fn),
                                                 config.reward_options.to_dict())
    with train, evaluate:
        out = train(torch.rand(2, 3, 16, 16), ["a", "b"], [{}, {}])[name]
        assert out.maps.shape[0] == 2 and json.loads(config.to_json_best_effort())["reward_options"][name] == {"size": 0.6}
