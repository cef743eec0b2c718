"""Issue 12, "nothing lost, nothing hung": fault injection and bad inputs, each with what it now gets.

docs/reliability.md lists every case; each test here is named after the property it proves.
"""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_collections
import pytest
import torch

from reward_maps.base import RewardMapError, RewardOutput, dataset_problems, resolve_factory
from reward_maps.workers import AsyncScorer, ScorerTimeoutError
from u_nft.checkpoint import (CheckpointCorruptError, TrainState, config_differences, list_checkpoints,
                              load_checkpoint, rng_restore_note, save_checkpoint, scan_checkpoints)
from u_nft.config_utils import ConfigError, validate_config
from u_nft.normalization import combine_rewards
from u_nft.run_logging import RunDirError, RunLogger, choose_run_dir, read_metrics, supersede_metrics

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PLUGIN_CONFIG = str(TESTS / "reliability_plugins.py")


def tiny_config():
    from test_train_e2e import tiny_config as load

    return load()


def save_step(run_dir, step, keep_last=None):
    state = TrainState(epoch=step, global_step=step)
    tensors = {"lora_default": {"w": torch.arange(1000, dtype=torch.float32) * step}, "optimizer": {"step": step}}
    return save_checkpoint(run_dir, state, tensors, rng=[{"x": torch.tensor([step])}], config={"lr": 0.1},
                           keep_last=keep_last)


# 1. A rerun never writes into an earlier run's folder ------------------------------------------------


def test_fresh_run_in_a_folder_with_checkpoints_is_refused_naming_both_ways_out(tmp_path):
    save_step(tmp_path / "tiny", 1)
    with pytest.raises(RunDirError) as err:
        choose_run_dir(tmp_path, "tiny", "")
    message = str(err.value)
    assert str(tmp_path / "tiny") in message and "checkpoint-1" in message
    assert f"--config.resume_from={tmp_path / 'tiny'}" in message and "--config.run_name" in message


def test_run_dir_choice_for_fresh_timestamped_and_resumed_runs(tmp_path):
    import datetime

    (tmp_path / "empty" / "images").mkdir(parents=True)  # a folder without checkpoints may be reused
    assert choose_run_dir(tmp_path, "empty") == tmp_path / "empty"
    now = datetime.datetime(2025, 1, 2, 3, 4, 5)
    assert choose_run_dir(tmp_path, "", now=now) == tmp_path / "20250102_030405"
    ckpt = save_step(tmp_path / "old", 3)
    assert choose_run_dir(tmp_path, "ignored", str(ckpt)) == tmp_path / "old"
    assert choose_run_dir(tmp_path, "ignored", str(tmp_path / "old")) == tmp_path / "old"
    assert choose_run_dir(tmp_path, "x", str(tmp_path / "old" / "checkpoints")) == tmp_path / "old"


def test_rerunning_a_finished_command_is_refused_before_models_load_and_keeps_the_checkpoint(tmp_path):
    from test_train_e2e import run_script

    ckpt = save_step(tmp_path / "tiny", 4)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    # pretrained.model points nowhere: reaching model loading would fail differently.
    proc = run_script(["--config", f"{REPO / 'config' / 'u_nft.py'}:tiny", f"--config.logdir={tmp_path}",
                       f"--config.pretrained.model={tmp_path / 'no_model'}"], expect_ok=False)
    assert proc.returncode != 0
    assert "RunDirError" in proc.stderr and "already holds checkpoints" in proc.stderr
    assert not (tmp_path / "no_model").exists()  # the tiny pipeline was not built: models never loaded
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


# 2. An evaluation failure does not cost the checkpoint ------------------------------------------------


def test_failing_evaluation_at_the_last_epoch_keeps_the_final_checkpoint(tmp_path, tiny_sd3_dir, monkeypatch):
    from test_train_e2e import run_script, small_run_args

    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = small_run_args(tmp_path, tiny_sd3_dir, "evalfail", epochs=1)
    args[1] = f"{PLUGIN_CONFIG}:eval_fails"
    args = [a for a in args if not a.startswith("--config.save_freq")] + ["--config.save_freq=0"]
    proc = run_script(args, expect_ok=False)
    assert proc.returncode != 0 and "injected evaluation failure" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "evalfail")
    assert (ckpt.state.epoch, ckpt.state.global_step) == (1, 1)
    assert (ckpt.path / "lora" / "pytorch_lora_weights.safetensors").is_file()


# 3. Every scorer checks the whole dataset up front, reporting every bad line --------------------------


def _config_with(tmp_path, reward, train_lines, suffix=".txt", options=None):
    config = tiny_config()
    path = tmp_path / f"train{suffix}"
    path.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    config.dataset.train = str(path)
    config.eval_freq = 0
    config.reward_fn = ml_collections.ConfigDict({reward: 1.0})
    config.eval_reward_fn = ml_collections.ConfigDict({reward: 1.0})
    config.reward_options = ml_collections.ConfigDict({reward: options} if options else {})
    return config, path


def _problems(config):
    with pytest.raises(ConfigError) as err:
        validate_config(config, world_size=1)
    return str(err.value)


def test_ocr_prompts_without_quoted_text_are_all_reported_with_file_and_line(tmp_path):
    lines = ['a sign that says "OPEN"', "a cat on a mat", "", 'a mug with " " printed', 'a book titled "Dune"',
             "no quotes here either"]
    config, path = _config_with(tmp_path, "ocr_map", lines)
    message = _problems(config)
    assert "config.dataset.train: 3 prompt line(s)" in message
    assert f"{path}:2: ocr_map: no quoted text" in message
    assert f"{path}:4: ocr_map: quotes an empty text" in message  # line 3 is blank: numbering follows the file
    assert f"{path}:6: ocr_map: no quoted text" in message
    assert f"{path}:1:" not in message and f"{path}:5:" not in message


def test_geneval_metadata_problems_are_reported_per_line_without_loading_the_detector(tmp_path):
    good = {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    rows = [good,
            {"prompt": "no tag", "include": [{"class": "cat", "count": 1}]},
            {"prompt": "no include", "tag": "single_object"},
            {"prompt": "unknown class", "tag": "single_object", "include": [{"class": "unicorn", "count": 1}]},
            {"prompt": "unknown colour", "tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]},
            {"prompt": "bad relation", "tag": "position", "include": [
                {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["behind", 0]}]}]
    config, path = _config_with(tmp_path, "geneval_map", [json.dumps(r) for r in rows], ".jsonl",
                                {"detector": str(tmp_path / "no_detector")})
    message = _problems(config)
    assert "5 prompt line(s)" in message
    assert f"{path}:2: geneval_map: metadata['tag'] = None is not a GenEval tag" in message
    assert f"{path}:3: geneval_map: metadata['include'] must be a non-empty list" in message
    assert f"{path}:4: geneval_map: metadata['include'][0]['class'] = 'unicorn'" in message
    assert f"{path}:5: geneval_map: metadata['include'][0]['color'] = 'teal'" in message
    assert f"{path}:6: geneval_map: metadata['include'][1]['position'] = ['behind', 0]" in message


def test_mask_and_region_datasets_report_missing_files_and_bad_regions(tmp_path):
    from PIL import Image

    root = tmp_path / "masks"
    root.mkdir()
    Image.new("L", (8, 8), 255).save(root / "ok.png")
    rows = [{"prompt": "a", "mask": "ok.png"}, {"prompt": "b", "mask": "missing.png"}, {"prompt": "c"},
            {"prompt": "d", "mask": "../outside.png"}]
    config, path = _config_with(tmp_path, "mask_file_map", [json.dumps(r) for r in rows], ".jsonl",
                                {"mask_root": str(root)})
    config.train.map_normalization = "none"
    message = _problems(config)
    assert f"{path}:2: mask_file_map: mask file 'missing.png' does not exist" in message
    assert f"{path}:3: mask_file_map: metadata['mask'] must be a mask file path, got None" in message
    assert f"{path}:4: mask_file_map: mask path '../outside.png' leaves mask_root" in message

    regions = [{"prompt": "a"}, {"prompt": "b", "regions": [{"box": [0.5, 0, 0.2, 1], "color": "#ff0000"}]},
               {"prompt": "c", "regions": [{"mask": "nope.png", "color": [1, 0, 0]}]}]
    config, path = _config_with(tmp_path, "region_color_map", [json.dumps(r) for r in regions], ".jsonl",
                                {"mask_root": str(root)})
    message = _problems(config)
    assert f"{path}:1: region_color_map: no layout" in message
    assert f"{path}:2: region_color_map: metadata['regions']: region 0: box [0.5, 0, 0.2, 1]" in message
    assert f"{path}:3: region_color_map: mask file " in message and "nope.png' does not exist" in message


def test_valid_datasets_pass_and_scorers_without_a_check_report_nothing(tmp_path):
    config, _ = _config_with(tmp_path, "ocr_map", ['a sign "A"', 'a cup "B"'])
    validate_config(config, world_size=1)
    assert dataset_problems("jpeg_map", ["anything"], [{}]) == []


# 4. Config keys that failed late or silently are refused at start-up, naming the key ------------------


@pytest.mark.parametrize("key,value,message", [
    ("checkpoints_total_limit", 0, "config.checkpoints_total_limit must be an integer >= 1"),
    ("sample.resolution", 0, "config.sample.resolution must be a positive integer"),
    ("sample.resolution", -64, "config.sample.resolution must be a positive integer"),
    ("reward_timeout_s", -1.0, "config.reward_timeout_s must be seconds >= 0"),
    ("dist_timeout_s", 0.0, "config.dist_timeout_s must be seconds > 0"),
])
def test_bad_run_keys_are_refused_naming_the_key(key, value, message):
    config = tiny_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate_config(config, world_size=1)


def test_one_image_per_prompt_is_refused_with_the_reason_unless_maps_are_unnormalized():
    config = tiny_config()
    config.sample.num_image_per_prompt = 1
    config.train.gradient_step_per_epoch = 1
    with pytest.raises(ConfigError, match=r"num_image_per_prompt = 1 trains nothing.*every r = 1/2"):
        validate_config(config, world_size=1)
    config.train.map_normalization = "none"
    validate_config(config, world_size=1)


@pytest.mark.parametrize("weight", ["abc", float("nan"), True])
def test_non_numeric_reward_weight_is_refused_naming_the_scorer(weight):
    config = tiny_config()
    config.reward_fn = ml_collections.ConfigDict({"region_color_map": weight})
    with pytest.raises(ConfigError, match=r"config.reward_fn\['region_color_map'\] = .*must be a finite number"):
        validate_config(config, world_size=1)


@pytest.mark.parametrize("name", [":fn", "pkg:", "a..b:fn", "mod:fn:extra"])
def test_malformed_plugin_names_get_the_accepted_form(name):
    with pytest.raises(RewardMapError, match=r"not a valid plug-in name; accepted: 'package.module:callable'"):
        resolve_factory(name)


def test_map_size_that_cannot_pool_is_refused_at_start_up_and_at_run_time_names_the_scorer():
    config = tiny_config()  # 64 px, cell 1 -> an 8x8 location grid
    config.reward_fn = ml_collections.ConfigDict({"ocr_map": 1.0})
    config.reward_options = ml_collections.ConfigDict({"ocr_map": {"map_size": (3, 3)}})
    with pytest.raises(ConfigError, match=r"config.reward_options\['ocr_map'\].map_size = \(3, 3\) .*8x8"):
        validate_config(config, world_size=1)
    with pytest.raises(ValueError, match=r"reward scorer 'ocr_map': reward map of size 5x5 cannot be pooled"):
        combine_rewards({"ocr_map": torch.rand(2, 5, 5)}, {"ocr_map": 1.0}, (8, 8))


# 5. Checkpoint integrity ---------------------------------------------------------------------------


def test_truncated_tensor_file_is_an_error_naming_the_file(tmp_path):
    path = save_step(tmp_path, 2)
    file = path / "lora_default.pt"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match=rf"{file}.*truncated"):
        load_checkpoint(path)


def test_flipped_bit_is_caught_by_the_checksum_naming_the_file(tmp_path):
    path = save_step(tmp_path, 2)
    file = path / "lora_default.pt"
    data = bytearray(file.read_bytes())
    data[-200] ^= 0x01  # inside the tensor bytes: torch.load alone would read a wrong weight silently
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=rf"{file} is damaged: its sha256"):
        load_checkpoint(path)
    for extra in ("config.json", "rng.pt"):  # every file is covered, not only tensors
        assert extra in json.loads((path / "state.json").read_text())["files"]


def test_corrupt_state_json_in_an_old_checkpoint_is_skipped_and_later_saves_rotate(tmp_path):
    save_step(tmp_path, 1)
    save_step(tmp_path, 2)
    (tmp_path / "checkpoints" / "checkpoint-1" / "state.json").write_text('{"format_version": 2, "sta')
    good, damaged = scan_checkpoints(tmp_path)
    assert [p.name for p in good] == ["checkpoint-2"] and damaged[0][0].name == "checkpoint-1"
    assert "not valid JSON" in damaged[0][1]
    assert load_checkpoint(tmp_path).state.global_step == 2
    for step in (3, 4, 5):
        save_step(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "checkpoints" / "checkpoint-1").is_dir()  # damaged: reported, left for inspection


def test_damaged_newest_checkpoint_is_skipped_on_resume_and_reported(tmp_path):
    save_step(tmp_path, 1)
    newest = save_step(tmp_path, 2)
    (newest / "optimizer.pt").write_bytes(b"")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state.global_step == 1
    assert [(p.name, "truncated" in why) for p, why in ckpt.skipped] == [("checkpoint-2", True)]
    (ckpt.path / "state.json").write_text("not json")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint.*checkpoint-1: .*not valid JSON.*checkpoint-2"):
        load_checkpoint(tmp_path)


# 6. Nothing hangs forever ------------------------------------------------------------------------


def _constant(images, prompts, metadata):
    maps = torch.full((images.shape[0], 2, 2), 0.5)
    return RewardOutput(maps, maps.mean(dim=(1, 2)), [{} for _ in prompts])


def test_scorer_call_past_its_timeout_fails_naming_scorer_batch_and_images():
    import threading

    release = threading.Event()

    def hangs_on_bad(images, prompts, metadata):
        if "bad" in prompts:
            release.wait(30)
        return _constant(images, prompts, metadata)

    pool = AsyncScorer(hangs_on_bad, name="stuck_map", num_workers=2, timeout_s=0.3)
    start = time.monotonic()
    future = pool.submit(torch.rand(4, 3, 2, 2), ["ok", "ok", "bad", "ok"], [{}] * 4, label="epoch 7 batch 2")
    with pytest.raises(ScorerTimeoutError, match=r"'stuck_map' timed out on epoch 7 batch 2, images 2:4"):
        future.result()
    assert time.monotonic() - start < 5
    release.set()
    pool.close()
    with AsyncScorer(_constant, timeout_s=0.3) as fine:  # a fast scorer is unaffected
        assert fine(torch.rand(2, 3, 2, 2), ["a", "b"], [{}, {}]).scores.tolist() == [0.5, 0.5]


def test_ctrl_c_ends_a_process_whose_scorer_thread_is_busy(tmp_path):
    script = tmp_path / "busy.py"
    script.write_text(textwrap.dedent("""
        import sys, time, torch
        from reward_maps.combine import RewardSet
        from reward_maps.workers import AsyncScorer
        pool = AsyncScorer(lambda i, p, m: time.sleep(600), name="busy", num_workers=1)
        future = pool.submit(torch.rand(1, 3, 2, 2), ["p"], [{}])
        print("waiting", flush=True)
        try:
            future.result()
        finally:
            pool.close(wait=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "waiting"
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - start < 20 and proc.returncode != 0
    assert "KeyboardInterrupt" in proc.stderr.read()


def _hang_run(tmp_path, tiny_sd3_dir, monkeypatch, *overrides):
    from test_train_e2e import free_port, small_run_args

    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = small_run_args(tmp_path, tiny_sd3_dir, "hang", epochs=1, batch=4)
    args[1] = f"{PLUGIN_CONFIG}:hang_rank1"
    args = [a for a in args if not a.startswith("--config.eval_freq")] + list(overrides)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "scripts" / "train_u_nft_sd3.py"), *args]
    start = time.monotonic()
    # The outer guard: before the fix this run hangs until the timeout below.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    return proc, time.monotonic() - start


def test_scorer_hung_on_one_of_two_ranks_ends_the_job_with_a_named_timeout(tmp_path, tiny_sd3_dir, monkeypatch):
    proc, elapsed = _hang_run(tmp_path, tiny_sd3_dir, monkeypatch, "--config.reward_timeout_s=3",
                              "--config.dist_timeout_s=60")
    assert proc.returncode != 0, proc.stdout[-2000:]
    out = proc.stdout + proc.stderr
    assert "reward scorer 'reliability_plugins:hangs_on_rank_one' timed out on epoch 0 batch 0, images" in out
    assert elapsed < 200


@pytest.mark.slow
def test_collective_timeout_ends_the_job_when_a_rank_is_stuck_without_a_scorer_timeout(tmp_path, tiny_sd3_dir,
                                                                                      monkeypatch):
    proc, elapsed = _hang_run(tmp_path, tiny_sd3_dir, monkeypatch, "--config.reward_timeout_s=0",
                              "--config.dist_timeout_s=10")
    assert proc.returncode != 0, proc.stdout[-2000:]
    out = proc.stdout + proc.stderr
    assert "Timed out waiting 10000ms" in out  # rank 0's gloo collective gave up on rank 1
    assert elapsed < 200


# 7. Mask paths are confined to mask_root -------------------------------------------------------------


def test_mask_paths_outside_mask_root_are_refused_alike_whether_they_exist_or_not(tmp_path):
    from PIL import Image

    from reward_maps import build_scorer

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("L", (4, 4), 255).save(root / "sub" / "in.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(root / "sub" / "in.png", root / "inner_link.png")
    scorer = build_scorer("mask_file_map", mask_root=str(root))
    images = torch.rand(1, 3, 4, 4)

    def error(path):
        with pytest.raises(RewardMapError) as err:
            scorer(images, ["p"], [{"mask": path}])
        return str(err.value)

    existing, missing = error("../secret.png"), error("../missing.png")
    assert "leaves mask_root" in existing
    assert existing.replace("secret", "X") == missing.replace("missing", "X")  # no existence oracle
    assert "leaves mask_root" in error(str(tmp_path / "secret.png"))  # absolute, outside
    assert "leaves mask_root" in error("escape.png")  # symlink out of the root
    assert "leaves mask_root" in error("sub/../../secret.png")
    for inside in ("sub/in.png", "inner_link.png", str(root / "sub" / "in.png"), "sub/../sub/in.png"):
        assert scorer(images, ["p"], [{"mask": inside}]).maps.eq(1).all()


# 8. Resume reports --------------------------------------------------------------------------------


def test_rng_restore_note_says_when_and_what_a_world_size_change_skips():
    assert rng_restore_note(2, 2) is None
    note = rng_restore_note(8, 2)
    assert "not restoring the global RNG states" in note and "8 ranks" in note and "2 rank(s)" in note
    assert "not bit-identically" in note
    assert "no RNG states" in rng_restore_note(None, 1)


def test_config_differences_list_changed_added_and_removed_keys():
    saved = {"train": {"learning_rate": 3e-4, "beta": 1.0, "targets": ["a", "b"]}, "seed": 1, "resume_from": "",
             "old": 1}
    current = {"train": {"learning_rate": 1e-3, "beta": 1.0, "targets": ("a", "b")}, "seed": 1,
               "resume_from": "/runs/x", "sample": {"train_batch_size": 4}}
    assert config_differences(saved, current) == [
        ("old", 1, "<absent>"), ("sample.train_batch_size", "<absent>", 4), ("train.learning_rate", 3e-4, 1e-3)]
    assert config_differences(None, current) == []


def test_metrics_written_after_the_checkpoint_are_moved_aside_on_resume(tmp_path):
    logger = RunLogger(tmp_path, wandb_mode="disabled")
    for epoch in range(4):
        logger.log({"train/loss": float(epoch)}, step=epoch + 1, epoch=epoch)
    logger.log({"eval/mean": 0.5}, step=4, epoch=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "step": 5, "epo')  # a write cut by the kill
    resumed = RunLogger(tmp_path, wandb_mode="disabled", start_epoch=2)  # the checkpoint holds epochs 0-1
    assert resumed.superseded == 4
    resumed.log({"train/loss": 2.5}, step=3, epoch=2)
    assert [(r["epoch"], r.get("train/loss")) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.5)]
    moved = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [m.get("epoch") for m in moved] == [2, 3, 3, None] and all(m["superseded"] for m in moved)
    assert supersede_metrics(tmp_path, 3) == 0
