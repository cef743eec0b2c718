"""Upstream DiffusionNFT config keys -> ours, and the command-line check that names the key to use instead.

Upstream: NVlabs/DiffusionNFT config/base.py and config/nft.py. Most keys are the same here; the
others are renamed (one meaning per name: ``train.beta`` here is upstream's ``config.beta``, and
upstream's ``config.train.beta``, the KL weight, is ``train.kl_weight``), derived from other keys, or
have no counterpart. ml_collections rejects an unknown key during flag parsing with a generic message,
so the train script calls :func:`upstream_override_problems` on ``sys.argv`` first. The full table with
values is docs/upstream_parity.md.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence


class KeyMapping(NamedTuple):
    ours: str | None  # our key ("" = none); several joined by " / "
    kind: str         # "same" | "renamed" | "meaning" (same path, other meaning here) | "derived" | "absent"
    note: str = ""


UPSTREAM_KEYS: dict[str, KeyMapping] = {
    "run_name": KeyMapping("run_name", "same"),
    "debug": KeyMapping(None, "absent", "no debug mode: --config.eval_freq=0 --config.save_freq=0 skips evaluation "
                                        "and intermediate checkpoints as upstream's debug does"),
    "seed": KeyMapping("seed", "same"),
    "logdir": KeyMapping("logdir", "same", "here the run folder (metrics, images, checkpoints) is logdir/run_name"),
    "num_epochs": KeyMapping("num_epochs", "same"),
    "save_freq": KeyMapping("save_freq", "same"),
    "eval_freq": KeyMapping("eval_freq", "same"),
    "mixed_precision": KeyMapping("mixed_precision", "same"),
    "allow_tf32": KeyMapping("allow_tf32", "same"),
    "resume_from": KeyMapping("resume_from", "same"),
    "use_lora": KeyMapping(None, "absent", "training is always LoRA; set lora.rank / lora.alpha"),
    "dataset": KeyMapping("dataset.train / dataset.test", "renamed",
                          "upstream's folder DIR holds train.txt / test.txt (or *_metadata.jsonl): set "
                          "--config.dataset.train=DIR/train.txt --config.dataset.test=DIR/test.txt"),
    "resolution": KeyMapping("sample.resolution", "renamed"),
    "base_model": KeyMapping(None, "absent", "SD3 / SD3.5 only; pretrained.model names the pipeline"),
    "pretrained.model": KeyMapping("pretrained.model", "same"),
    "pretrained.revision": KeyMapping(None, "absent", "point pretrained.model at a local snapshot of that revision"),
    "sample.num_steps": KeyMapping("sample.num_steps", "same"),
    "sample.eval_num_steps": KeyMapping("sample.eval_num_steps", "same"),
    "sample.guidance_scale": KeyMapping("sample.guidance_scale / sample.eval_guidance_scale", "same",
                                        "upstream uses one scale for rollouts and evaluation"),
    "sample.train_batch_size": KeyMapping("sample.train_batch_size", "same"),
    "sample.num_image_per_prompt": KeyMapping("sample.num_image_per_prompt", "same"),
    "sample.test_batch_size": KeyMapping("sample.test_batch_size", "same"),
    "sample.num_batches_per_epoch": KeyMapping("sample.num_groups", "derived",
                                               "set the prompt groups per epoch (all ranks); sampling batches per "
                                               "rank = num_groups * num_image_per_prompt / (ranks * train_batch_size)"),
    "sample.global_std": KeyMapping("train.map_scale", "renamed", "True = 'global', False = 'group'"),
    "sample.noise_level": KeyMapping("sample.eta", "renamed",
                                     "upstream's named configs sample deterministically, so its 0.7 is unused"),
    "sample.deterministic": KeyMapping("sample.eta", "renamed", "deterministic = eta 0 (the default)"),
    "sample.solver": KeyMapping("sample.solver", "same"),
    "train.batch_size": KeyMapping("train.batch_size", "same"),
    "train.learning_rate": KeyMapping("train.learning_rate", "same"),
    "train.adam_beta1": KeyMapping("train.adam_beta1", "same"),
    "train.adam_beta2": KeyMapping("train.adam_beta2", "same"),
    "train.adam_weight_decay": KeyMapping("train.adam_weight_decay", "same"),
    "train.adam_epsilon": KeyMapping("train.adam_epsilon", "same"),
    "train.gradient_accumulation_steps": KeyMapping("train.gradient_step_per_epoch", "derived",
                                                    "set the optimizer steps per epoch (upstream's "
                                                    "gradient_step_per_epoch); accumulation is derived from it"),
    "train.max_grad_norm": KeyMapping("train.max_grad_norm", "same"),
    "train.num_inner_epochs": KeyMapping("train.num_inner_epochs", "same"),
    "train.adv_clip_max": KeyMapping("train.adv_clip_max", "same"),
    "train.adv_mode": KeyMapping("train.adv_mode", "same"),
    "train.timestep_fraction": KeyMapping("train.timestep_fraction", "same"),
    "train.beta": KeyMapping("train.kl_weight", "meaning",
                             "upstream's config.train.beta is the KL weight, train.kl_weight here; train.beta here is "
                             "upstream's config.beta (the implicit-policy strength)"),
    "train.lora_path": KeyMapping("lora.init_path", "renamed"),
    "train.ema": KeyMapping("train.ema", "same"),
    "prompt_fn": KeyMapping("dataset.train", "absent",
                            "the prompt file decides: .txt = a prompt per line, .jsonl = prompt + metadata (GenEval)"),
    "prompt_fn_kwargs": KeyMapping(None, "absent", "prompts come from files (dataset.train / dataset.test)"),
    "reward_fn": KeyMapping("reward_fn", "same", "scorer names differ: see UPSTREAM_REWARD_NAMES"),
    "save_dir": KeyMapping("logdir / run_name", "renamed", "checkpoints go to logdir/run_name/checkpoints"),
    "per_prompt_stat_tracking": KeyMapping("train.map_normalization", "renamed",
                                           "True = 'group' (upstream requires True)"),
    "beta": KeyMapping("train.beta", "renamed"),
    "decay_type": KeyMapping("train.decay_type", "renamed"),
}

# Upstream flow_grpo/rewards.py multi_score names -> the scorer here (None: not shipped).
UPSTREAM_REWARD_NAMES: dict[str, str | None] = {
    "ocr": "ocr_map", "geneval": "geneval_map", "pickscore": "pickscore_map", "clipscore": "clipscore_map",
    "hpsv2": "hps_map", "jpeg_compressibility": "jpeg_map",
    "aesthetic": None, "imagereward": None, "unifiedreward": None,
}


def _override_keys(argv: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """(key, the argument as given) for each ``--flag.KEY[=VALUE]`` / ``-flag.KEY`` in argv."""
    found = []
    for arg in argv:
        for prefix in (f"--{flag}.", f"-{flag}."):
            if arg.startswith(prefix):
                found.append((arg[len(prefix):].split("=", 1)[0], arg))
                break
    return found


def upstream_override_problems(argv: Sequence[str], flag: str = "config") -> tuple[list[str], list[str]]:
    """Check command-line overrides for upstream DiffusionNFT keys that are not ours.

    Returns (errors, notes): an error for an upstream key that is renamed, derived or absent here (and for
    an upstream scorer name under reward_fn), naming the key to use instead; a note for a key that exists
    here with another meaning (``train.beta``). ``dataset`` is an error only when given a value itself
    (``--config.dataset=DIR``), not for ``--config.dataset.train``.
    """
    errors, notes = [], []
    for key, arg in _override_keys(argv, flag):
        mapping = UPSTREAM_KEYS.get(key)
        if key.startswith(("reward_fn.", "eval_reward_fn.")):
            table, name = key.split(".", 1)
            if name in UPSTREAM_REWARD_NAMES:
                ours = UPSTREAM_REWARD_NAMES[name]
                instead = (f"use --{flag}.{table}.{ours}=WEIGHT" if ours else
                           "it is not shipped here; plug in your own scorer (docs/custom_rewards.md)")
                errors.append(f"{arg}: {name!r} is upstream DiffusionNFT's scorer name; {instead}")
            continue
        if mapping is None or mapping.kind == "same":
            continue
        if mapping.kind == "meaning":
            notes.append(f"{arg}: {mapping.note}")
            continue
        if mapping.kind in ("renamed", "derived") and mapping.ours:
            targets = " / ".join(f"--{flag}.{k.strip()}" for k in mapping.ours.split("/"))
            why = f" ({mapping.note})" if mapping.note else ""
            verb = "is" if mapping.kind == "renamed" else "is derived here; set"
            errors.append(f"{arg}: upstream DiffusionNFT's config.{key} {verb} {targets}{why}")
        else:
            errors.append(f"{arg}: upstream DiffusionNFT's config.{key} has no counterpart here: {mapping.note}")
    return errors, notes


def exit_on_upstream_keys(argv: Sequence[str], flag: str = "config") -> None:
    """Before flag parsing: print the notes to stderr, and exit (status 1) listing every error."""
    import sys

    errors, notes = upstream_override_problems(argv, flag)
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if errors:
        raise SystemExit("error: " + "\nerror: ".join(errors) + "\n(upstream key -> our key: docs/upstream_parity.md)")
