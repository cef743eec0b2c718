"""Checkpoints: atomic writes, pruning, counters from the state file, RNG and optimizer round trips."""
import random

import ml_collections
import numpy as np
import pytest
import torch

from u_nft.checkpoint import (
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def small_tensors(step: int) -> dict:
    return {"lora_default": {"a.lora_A.weight": torch.full((2, 3), float(step))},
            "scaler": {"scale": 65536.0, "_growth_tracker": step}}


def save(run_dir, step, **kwargs):
    state = TrainState(epoch=step // 2, global_step=step, sampler={"epoch": step // 2, "position": 1})
    return save_checkpoint(run_dir, state, small_tensors(step), **kwargs)


def test_checkpoint_round_trip_restores_state_tensors_and_config(tmp_path):
    config = ml_collections.ConfigDict({"train": {"lr": 3e-4, "targets": ("attn.to_q",)}, "seed": 7})
    path = save(tmp_path, 4, config=config, rng=capture_rng())
    assert path == tmp_path / "checkpoints" / "checkpoint-4"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path
    assert ckpt.state == TrainState(epoch=2, global_step=4, sampler={"epoch": 2, "position": 1})
    assert torch.equal(ckpt.tensors["lora_default"]["a.lora_A.weight"], torch.full((2, 3), 4.0))
    assert ckpt.tensors["scaler"] == {"scale": 65536.0, "_growth_tracker": 4}
    assert ckpt.config["train"]["lr"] == 3e-4 and ckpt.config["seed"] == 7
    assert ckpt.rng is not None


def test_crash_mid_write_leaves_previous_checkpoint_latest(tmp_path):
    save(tmp_path, 2)

    def crash(folder):
        (folder / "half_written.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        save(tmp_path, 4, lora_dirs=crash)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-checkpoint-4").is_dir() and not (root / "checkpoint-4").exists()
    assert list_checkpoints(tmp_path) == [root / "checkpoint-2"]
    assert load_checkpoint(tmp_path).state.global_step == 2

    # The next successful save clears the leftover.
    save(tmp_path, 6)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-6"]


def test_folder_without_state_file_is_incomplete_and_skipped(tmp_path):
    save(tmp_path, 2)
    broken = tmp_path / "checkpoints" / "checkpoint-9"
    broken.mkdir()
    (broken / "lora_default.pt").write_bytes(b"")
    assert load_checkpoint(tmp_path).state.global_step == 2
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9 is incomplete: state.json"):
        load_checkpoint(broken)


def test_missing_tensor_file_is_reported_with_path(tmp_path):
    path = save(tmp_path, 2)
    (path / "scaler.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2 is incomplete: scaler.pt"):
        load_checkpoint(path)


def test_missing_or_empty_run_dir_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_counters_come_from_state_file_not_folder_name(tmp_path):
    save(tmp_path, 4)
    save(tmp_path, 10)
    root = tmp_path / "checkpoints"
    (root / "checkpoint-4").rename(root / "checkpoint-999")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path.name == "checkpoint-10" and ckpt.state.global_step == 10
    assert load_checkpoint(root / "checkpoint-999").state.global_step == 4


def test_keep_last_leaves_exactly_the_newest_n(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-8"]
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 10, keep_last=0)


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    save(tmp_path, 4)
    state = TrainState(epoch=3, global_step=4)
    save_checkpoint(tmp_path, state, {"x": {"v": torch.ones(1)}})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state.epoch == 3 and set(ckpt.tensors) == {"x"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]


def test_lora_dirs_callback_writes_inside_the_checkpoint(tmp_path):
    path = save(tmp_path, 2, lora_dirs=lambda folder: (folder / "lora").mkdir())
    assert (path / "lora").is_dir()


def test_bad_tensor_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tensor name 'a/b'"):
        save_checkpoint(tmp_path, TrainState(), {"a/b": {}})


def draw():
    return random.random(), float(np.random.rand()), np.random.randn(3).tolist(), torch.randn(4).tolist()


def test_rng_round_trip_reproduces_next_random_numbers(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save(tmp_path, 2, rng=capture_rng())
    expected = draw()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(load_checkpoint(tmp_path).rng)
    assert draw() == expected


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    x = torch.randn(8, 4)

    def train_step(m, o):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    for _ in range(2):
        train_step(model, opt)
    save_checkpoint(tmp_path, TrainState(global_step=2),
                    {"model": model.state_dict(), "optimizer": opt.state_dict()})

    ckpt = load_checkpoint(tmp_path)
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(ckpt.tensors["model"])
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=1e-4)
    clone_opt.load_state_dict(ckpt.tensors["optimizer"])
    train_step(model, opt)
    train_step(clone, clone_opt)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert clone_opt.state_dict()["state"][0]["step"] == 3
