"""Prompt files and the K-repeat sampler that gives each prompt K images per epoch.

DiffusionNFT normalises rewards within the K images of one prompt (docs/upstream_facts.md §E), so every epoch
draws ``num_groups`` prompts and generates ``K = num_image_per_prompt`` images of each, spread over
all ranks and sampling batches (upstream ``DistributedKRepeatSampler``, NVlabs/DiffusionNFT).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

PROMPT_FORMATS = (".txt", ".jsonl")


def load_prompts(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """Read prompts and their metadata.

    ``.txt``: one prompt per line, surrounding whitespace stripped, empty lines skipped; metadata {}.
    ``.jsonl`` (GenEval ``*_metadata.jsonl``): one JSON object per non-empty line with a string
    ``"prompt"``; the whole object is that prompt's metadata (tag, include, exclude, ...).
    Returns (prompts, metadata), equal lengths, in file order.
    """
    prompts, metadata, _ = load_prompt_lines(path)
    return prompts, metadata


def load_prompt_lines(path: str | os.PathLike) -> tuple[list[str], list[dict], list[int]]:
    """:func:`load_prompts` plus each prompt's 1-based line number in the file (for file:line errors)."""
    path = Path(path)
    if path.suffix not in PROMPT_FORMATS:
        raise ValueError(f"prompt file {path} has suffix {path.suffix!r}; accepted: {list(PROMPT_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts: list[str] = []
    metadata: list[dict] = []
    lines: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".txt":
                prompts.append(line)
                metadata.append({})
                lines.append(lineno)
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string \"prompt\" field")
            prompts.append(item["prompt"])
            metadata.append(item)
            lines.append(lineno)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts, metadata, lines


class KRepeatSampler:
    """Per-epoch K-repeat sampling of prompt indices, dealt to ranks in equal batches.

    Epoch e (same on every rank, seeded by (seed, e)):
      1. draw ``num_groups`` prompt indices without replacement (successive permutations of all
         prompts when num_groups > num_prompts),
      2. repeat each K times and shuffle the num_groups·K samples,
      3. cut them into rounds of world_size·batch_size; in round b rank r takes
         samples[(b·world_size + r)·batch_size : (b·world_size + r + 1)·batch_size].
    So every drawn prompt appears exactly K times across ranks and batches, and the ranks' samples
    are disjoint and together complete. Iterating yields this rank's batches (lists of prompt
    indices) forever, epoch after epoch; ``state_dict`` records (epoch, position) for exact resume.
    """

    def __init__(self, num_prompts: int, k: int, num_groups: int, batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        if num_prompts < 1:
            raise ValueError(f"KRepeatSampler needs at least one prompt, got num_prompts={num_prompts}")
        for key, value in (("sample.num_image_per_prompt", k), ("sample.num_groups", num_groups),
                           ("sample.train_batch_size", batch_size), ("world size", world_size)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world size {world_size})")
        per_round = world_size * batch_size
        if (num_groups * k) % per_round:
            raise ValueError(
                f"sample.num_groups × sample.num_image_per_prompt = {num_groups} × {k} = {num_groups * k} "
                f"must be divisible by world size × sample.train_batch_size = {world_size} × {batch_size} "
                f"= {per_round}"
            )
        self.num_prompts, self.k, self.num_groups = num_prompts, k, num_groups
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        """Sampling batches each rank runs per epoch: num_groups·K / (world_size·batch_size)."""
        return self.num_groups * self.k // (self.world_size * self.batch_size)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.seed), int(epoch)])))

    def groups(self, epoch: int) -> list[int]:
        """The ``num_groups`` prompt indices drawn in ``epoch`` (same on every rank)."""
        return self._draw(self._rng(epoch))

    def _draw(self, rng: np.random.Generator) -> list[int]:
        rounds = -(-self.num_groups // self.num_prompts)
        drawn = np.concatenate([rng.permutation(self.num_prompts) for _ in range(rounds)])
        return drawn[: self.num_groups].tolist()

    def epoch_samples(self, epoch: int) -> list[int]:
        """All num_groups·K sample indices of ``epoch`` in dealing order (every rank's, interleaved)."""
        rng = self._rng(epoch)
        repeated = np.repeat(np.asarray(self._draw(rng), dtype=np.int64), self.k)
        return repeated[rng.permutation(repeated.size)].tolist()

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, each a list of ``batch_size`` prompt indices."""
        samples = self.epoch_samples(epoch)
        out = []
        for b in range(self.batches_per_epoch):
            start = (b * self.world_size + self.rank) * self.batch_size
            out.append(samples[start : start + self.batch_size])
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            batches = self.batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                # Advance before yielding: a state_dict taken after receiving a batch resumes after it.
                self.position += 1
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": self.num_prompts,
                "k": self.k, "num_groups": self.num_groups}

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, position); the sampling setup must match the one saved.

        ``position`` counts this rank's batches, so resume with the same world size and batch size.
        """
        for key in ("seed", "num_prompts", "k", "num_groups"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has {key}={getattr(self, key)}; "
                    "resuming would draw different prompts"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
