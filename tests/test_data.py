"""Prompt files, the K-repeat sampler, and the distributed helpers (single process and 2-process gloo)."""
import json
import os
import socket
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from u_nft import distributed
from u_nft.data import KRepeatSampler, load_prompts

from prompt_data import data_root, full_public_sets


# Prompt files -------------------------------------------------------------------------------------

def test_txt_prompts_skip_empty_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('a sign saying "hi"\n\n   \n  two  \n', encoding="utf-8")
    prompts, metadata = load_prompts(path)
    assert prompts == ['a sign saying "hi"', "two"]
    assert metadata == [{}, {}]


def test_jsonl_prompts_keep_metadata(tmp_path):
    rows = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
            {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    prompts, metadata = load_prompts(path)
    assert prompts == ["a photo of a dog", "a photo of two cats"]
    assert metadata == rows


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": \n', r"m.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n\n{"tag": "x"}\n', r"m.jsonl:3: expected a JSON object with a string \"prompt\""),
    ('["a"]\n', r"m.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_line_is_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_unknown_suffix_and_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"p.csv.*accepted: \['.txt', '.jsonl'\]"):
        load_prompts(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")


def test_benchmark_prompt_files_load():
    """The fixtures by default; with U_NFT_DATA the public sets, whose sizes are checked too."""
    ocr, ocr_meta = load_prompts(data_root() / "ocr" / "test.txt")
    assert all(p.count('"') >= 2 for p in ocr) and ocr_meta[0] == {}
    geneval, meta = load_prompts(data_root() / "geneval" / "test_metadata.jsonl")
    distinct = list(dict.fromkeys(geneval))
    assert geneval == distinct * 4  # GenEval's layout: the prompt list four times (4 images per prompt)
    if full_public_sets():
        assert len(ocr) == 1018 and len(geneval) == 2212 and len(distinct) == 553
    assert {m["tag"] for m in meta} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert all(m["prompt"] == p for p, m in zip(geneval, meta))
    sampler = KRepeatSampler(len(geneval), k=4, num_groups=48, batch_size=8, world_size=2, rank=1, seed=0)
    batch = next(iter(sampler))
    assert len(batch) == 8 and all(0 <= i < len(geneval) for i in batch)


# K-repeat sampler ---------------------------------------------------------------------------------

def all_ranks(epoch, world_size=4, **kw):
    return [KRepeatSampler(world_size=world_size, rank=r, **kw).batches(epoch) for r in range(world_size)]


SETUP = dict(num_prompts=30, k=6, num_groups=8, batch_size=3, seed=5)  # 48 samples = 4 batches × 4 ranks × 3


def test_every_drawn_prompt_appears_exactly_k_times_across_ranks():
    for epoch in range(3):
        per_rank = all_ranks(epoch, **SETUP)
        samples = [i for batches in per_rank for batch in batches for i in batch]
        groups = KRepeatSampler(**SETUP).groups(epoch)
        assert len(set(groups)) == 8  # without replacement
        assert Counter(samples) == {g: 6 for g in groups}
        assert all(len(b) == 3 for batches in per_rank for b in batches)
        assert all(len(batches) == 4 for batches in per_rank)


def test_ranks_deal_disjoint_slices_of_one_permutation():
    sampler = KRepeatSampler(world_size=4, rank=0, **SETUP)
    order = sampler.epoch_samples(1)
    per_rank = all_ranks(1, **SETUP)
    # Round b, rank r holds samples [(b·4 + r)·3, (b·4 + r + 1)·3): positions are disjoint and cover all 48.
    rebuilt = [i for b in range(4) for r in range(4) for i in per_rank[r][b]]
    assert rebuilt == order


def test_more_groups_than_prompts_draws_full_permutations():
    sampler = KRepeatSampler(num_prompts=5, k=2, num_groups=12, batch_size=4, seed=0)
    counts = Counter(sampler.groups(0))
    # Two whole permutations of the 5 prompts, then 2 prompts of a third: as even as possible.
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]


def test_sampler_is_deterministic_and_epochs_differ():
    a, b = KRepeatSampler(**SETUP), KRepeatSampler(**SETUP)
    assert list(islice(iter(a), 40)) == list(islice(iter(b), 40))
    assert a.batches(0) != a.batches(1)
    assert KRepeatSampler(**{**SETUP, "seed": 6}).batches(0) != a.batches(0)


def test_iteration_rolls_over_epochs():
    sampler = KRepeatSampler(world_size=2, rank=1, **{**SETUP, "batch_size": 4})
    assert sampler.batches_per_epoch == 6
    got = list(islice(iter(sampler), 8))
    assert got == sampler.batches(0) + sampler.batches(1)[:2]
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 2


def test_resume_mid_epoch_yields_identical_remainder():
    reference = KRepeatSampler(world_size=2, rank=0, **{**SETUP, "batch_size": 4})
    full = list(islice(iter(reference), 15))
    first = KRepeatSampler(world_size=2, rank=0, **{**SETUP, "batch_size": 4})
    head = list(islice(iter(first), 9))  # epoch 1, position 3
    state = json.loads(json.dumps(first.state_dict()))
    resumed = KRepeatSampler(world_size=2, rank=0, **{**SETUP, "batch_size": 4})
    resumed.load_state_dict(state)
    assert head + list(islice(iter(resumed), 6)) == full


def test_resume_rejects_different_sampling_setup():
    state = KRepeatSampler(**SETUP).state_dict()
    with pytest.raises(ValueError, match="seed=5.*seed=6"):
        KRepeatSampler(**{**SETUP, "seed": 6}).load_state_dict(state)


def test_indivisible_setup_error_names_the_config_keys():
    with pytest.raises(ValueError) as err:
        KRepeatSampler(num_prompts=10, k=5, num_groups=3, batch_size=4, world_size=2, rank=0)
    for key in ("sample.num_groups", "sample.num_image_per_prompt", "sample.train_batch_size", "world size"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="rank 2"):
        KRepeatSampler(num_prompts=10, k=2, num_groups=2, batch_size=2, world_size=2, rank=2)


# Distributed helpers ------------------------------------------------------------------------------

def test_single_process_fallback(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size) == (0, 1)
    assert distributed.is_main() and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.arange(6).reshape(3, 2)
    assert torch.equal(distributed.all_gather_tensor(x), x)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("hello") == "hello"
    distributed.barrier()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.ones(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    # LOCAL_RANK 0 for both: on a one-GPU machine init_distributed would otherwise bind a missing cuda:1.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    torch.set_num_threads(1)
    info = distributed.init_distributed(backend="gloo")
    try:
        gathered = distributed.all_gather_tensor(torch.full((2, 3), float(rank)))
        objects = distributed.all_gather_object({"rank": rank})
        broadcast = distributed.broadcast_object(f"from {rank}")
        try:
            distributed.all_gather_tensor(torch.zeros(rank + 1))
            shape_error = ""
        except ValueError as err:
            shape_error = str(err)
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.full((3,), 2.0 * rank + 1.0)  # 1 on rank 0, 3 on rank 1
        missing = torch.nn.Parameter(torch.zeros(2))  # no grad: counts as zeros
        distributed.average_gradients([param, missing])
        distributed.barrier()
        torch.save({"grads": (param.grad, missing.grad), "info": (info.rank, info.world_size), "gathered": gathered, "objects": objects,
                    "broadcast": broadcast, "shape_error": shape_error}, Path(out_dir) / f"{rank}.pt")
    finally:
        distributed.cleanup()


def test_two_process_gather_is_in_rank_order(tmp_path):
    # fork skips re-importing torch in the children (seconds each on a loaded machine); it is unsafe
    # once CUDA is initialised, so fall back to spawn then.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert result["info"] == (rank, 2)
        assert torch.equal(result["gathered"], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]
        assert result["broadcast"] == "from 0"
        assert "equal shapes" in result["shape_error"] and "[(1,), (2,)]" in result["shape_error"]
        assert torch.equal(result["grads"][0], torch.full((3,), 2.0))
        assert torch.equal(result["grads"][1], torch.zeros(2))
