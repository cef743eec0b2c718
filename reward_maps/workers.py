"""Run a scorer in a thread pool, so scoring overlaps sampling and a CPU-heavy scorer uses many threads.

``AsyncScorer(scorer).submit(images, prompts, metadata)`` returns at once with a Future; the batch is
split into contiguous chunks that are scored in parallel, and the chunk outputs are concatenated back
in the original order. Threads (not processes) suffice because the heavy work of our scorers (ONNX
Runtime OCR, PIL JPEG encoding, torch ops) releases the GIL; the scorer must therefore be thread-safe
for concurrent calls on different chunks (ours are: they keep no per-call state). With
``num_workers=1`` chunks run one after another, still off the caller's thread.

Typical use in a training loop::

    pending = async_scorer.submit(images, prompts, metadata)   # returns immediately
    next_images = sample(...)                                   # overlaps with scoring
    output = pending.result()                                   # RewardOutput, in order
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
from typing import Any

import torch

from reward_maps.base import RewardMapError, RewardOutput, RewardScorer, validate_output

__all__ = ["AsyncScorer", "chunk_bounds", "concatenate_outputs"]


def chunk_bounds(batch_size: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split range(batch_size) into at most num_chunks contiguous, near-equal, non-empty [lo, hi) pieces."""
    num_chunks = max(1, min(num_chunks, batch_size))
    size = math.ceil(batch_size / num_chunks) if batch_size else 0
    return [(lo, min(lo + size, batch_size)) for lo in range(0, batch_size, size)] if batch_size else []


def concatenate_outputs(name: str, outputs: list[RewardOutput]) -> RewardOutput:
    """Concatenate chunk outputs along the batch (maps, scores, info in order).

    All chunks must share the map size and value_range; the union would hide a scorer bug.
    """
    shapes = {tuple(o.maps.shape[1:]) for o in outputs}
    ranges = {o.value_range for o in outputs}
    if len(shapes) > 1 or len(ranges) > 1:
        raise RewardMapError(
            f"reward scorer {name!r}: chunks disagree (map sizes {sorted(shapes)}, value ranges {sorted(map(str, ranges))})"
        )
    return RewardOutput(
        maps=torch.cat([o.maps for o in outputs]),
        scores=torch.cat([o.scores for o in outputs]),
        info=[entry for o in outputs for entry in o.info],
        value_range=outputs[0].value_range,
    )


class AsyncScorer:
    """A scorer wrapped in a thread pool; itself a scorer (``__call__`` = ``submit(...).result()``).

    scorer: any callable with the boundary signature. name: used in errors (default: the callable's
    name). num_workers: threads. chunk_size: images per chunk; default splits each batch into
    ``num_workers`` chunks. Each chunk's output is checked with :func:`validate_output`.
    """

    def __init__(self, scorer: RewardScorer, name: str | None = None, num_workers: int = 4, chunk_size: int | None = None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise RewardMapError(f"AsyncScorer: num_workers={num_workers!r}; accepted: integers >= 1")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise RewardMapError(f"AsyncScorer: chunk_size={chunk_size!r}; accepted: None or integers >= 1")
        self.scorer = scorer
        self.name = name or getattr(scorer, "__qualname__", type(scorer).__name__)
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix=f"score-{self.name}")

    def _score_chunk(self, images, prompts, metadata, lo: int, hi: int) -> RewardOutput:
        try:
            out = self.scorer(images[lo:hi], prompts[lo:hi], metadata[lo:hi])
            return validate_output(self.name, out, hi - lo)
        except Exception as err:
            raise RewardMapError(f"reward scorer {self.name!r} failed on images {lo}:{hi}: {err}") from err

    def submit(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> concurrent.futures.Future:
        """Start scoring; returns a Future of the batch's RewardOutput (chunks concatenated in order).

        A failing chunk sets the Future's exception: a RewardMapError naming the scorer and the image
        range, chained to the original error.
        """
        batch = len(prompts)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(batch)]
        chunks = math.ceil(batch / self.chunk_size) if self.chunk_size else self.num_workers
        bounds = chunk_bounds(batch, chunks)
        result: concurrent.futures.Future = concurrent.futures.Future()
        result.set_running_or_notify_cancel()
        if not bounds:
            result.set_exception(RewardMapError(f"reward scorer {self.name!r}: empty batch"))
            return result
        futures = [self._pool.submit(self._score_chunk, images, prompts, metadata, lo, hi) for lo, hi in bounds]
        remaining = [len(futures)]
        lock = threading.Lock()

        # Combine in a callback of the last chunk to finish: no pool thread blocks waiting on others.
        def on_chunk_done(_: concurrent.futures.Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                result.set_exception(errors[0])
                return
            try:
                result.set_result(concatenate_outputs(self.name, [f.result() for f in futures]))
            except Exception as err:  # noqa: BLE001 - hand any combination error to the waiting caller
                result.set_exception(err)

        for future in futures:
            future.add_done_callback(on_chunk_done)
        return result

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None) -> RewardOutput:
        return self.submit(images, prompts, metadata).result()

    def close(self, wait: bool = True) -> None:
        """Shut the pool down (waits for running chunks unless wait=False)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
