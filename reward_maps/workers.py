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

Nothing hangs forever: with ``timeout_s`` a chunk that runs longer than that (counted from when a worker
picks it up, not from submission) makes ``result()`` raise :class:`ScorerTimeoutError` naming the scorer,
the batch label and the image range. The workers are daemon threads, so a hung scorer call never keeps
the process alive after an error or Ctrl-C (``concurrent.futures.ThreadPoolExecutor`` joins its threads
at exit); ``close(wait=False)`` abandons them.
"""
from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from typing import Any

import torch

from reward_maps.base import RewardMapError, RewardOutput, RewardScorer, validate_output

__all__ = ["AsyncScorer", "ScorerTimeoutError", "chunk_bounds", "concatenate_outputs"]


class ScorerTimeoutError(RewardMapError):
    """A scorer call ran past its timeout; the message names the scorer, the batch and the images."""


class _DaemonPool:
    """``num_workers`` daemon threads fed from a FIFO queue; ``submit(fn, *args)`` -> Future.

    Unlike ThreadPoolExecutor, nothing joins these threads at interpreter exit, so a task stuck in a
    scorer cannot keep a failed or interrupted process alive.
    """

    def __init__(self, num_workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(num_workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a closed AsyncScorer")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args))
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                value = fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(err)
            else:
                future.set_result(value)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class ScoringFuture(concurrent.futures.Future):
    """The Future of one submitted batch; ``result()`` enforces the scorer's per-chunk timeout."""

    def __init__(self, name: str, label: str | None, bounds: list[tuple[int, int]], timeout_s: float | None):
        super().__init__()
        self._name, self._label, self._bounds, self._timeout_s = name, label, bounds, timeout_s
        self._starts: list[float | None] = [None] * len(bounds)
        self._chunks: list[concurrent.futures.Future] = []

    def _overdue(self) -> int | None:
        now = time.monotonic()
        for i, (start, chunk) in enumerate(zip(self._starts, self._chunks)):
            if start is not None and not chunk.done() and now - start > self._timeout_s:
                return i
        return None

    def _wait(self, timeout: float | None) -> float | None:
        """Wait until done, the caller's ``timeout`` passes, or a chunk overruns; returns the time left."""
        if self._timeout_s is None:
            return timeout
        poll = min(0.5, self._timeout_s / 4)
        give_up = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            late = self._overdue()
            if late is not None:
                lo, hi = self._bounds[late]
                batch = f" on {self._label}" if self._label else ""
                raise ScorerTimeoutError(
                    f"reward scorer {self._name!r} timed out{batch}, images {lo}:{hi}: no result after "
                    f"{self._timeout_s:g} s (timeout_s; config.reward_timeout_s in training). The stuck call is "
                    "abandoned in its worker thread."
                )
            if give_up is not None and time.monotonic() >= give_up:
                return 0.0  # the base class raises TimeoutError
            concurrent.futures.wait([self], timeout=poll)
        return timeout

    def result(self, timeout: float | None = None):
        return super().result(timeout=self._wait(timeout))

    def exception(self, timeout: float | None = None):
        try:
            left = self._wait(timeout)
        except ScorerTimeoutError as err:
            return err
        return super().exception(timeout=left)


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
    timeout_s: seconds one chunk may run once started (None or 0 = no limit); see :class:`ScorerTimeoutError`.
    """

    def __init__(self, scorer: RewardScorer, name: str | None = None, num_workers: int = 4, chunk_size: int | None = None,
                 timeout_s: float | None = None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise RewardMapError(f"AsyncScorer: num_workers={num_workers!r}; accepted: integers >= 1")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise RewardMapError(f"AsyncScorer: chunk_size={chunk_size!r}; accepted: None or integers >= 1")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s >= 0):
            raise RewardMapError(f"AsyncScorer: timeout_s={timeout_s!r}; accepted: None, 0 (no limit) or seconds > 0")
        self.scorer = scorer
        self.name = name or getattr(scorer, "__qualname__", type(scorer).__name__)
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self.timeout_s = float(timeout_s) if timeout_s else None
        self._pool = _DaemonPool(num_workers, f"score-{self.name}")

    def _score_chunk(self, images, prompts, metadata, lo: int, hi: int, starts: list | None = None,
                     index: int = 0) -> RewardOutput:
        if starts is not None:
            starts[index] = time.monotonic()
        try:
            out = self.scorer(images[lo:hi], prompts[lo:hi], metadata[lo:hi])
            return validate_output(self.name, out, hi - lo)
        except Exception as err:
            raise RewardMapError(f"reward scorer {self.name!r} failed on images {lo}:{hi}: {err}") from err

    def submit(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None,
        label: str | None = None,
    ) -> concurrent.futures.Future:
        """Start scoring; returns a Future of the batch's RewardOutput (chunks concatenated in order).

        A failing chunk sets the Future's exception: a RewardMapError naming the scorer and the image
        range, chained to the original error. label: names the batch in a timeout error (e.g. "epoch 3 batch 1").
        """
        batch = len(prompts)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(batch)]
        chunks = math.ceil(batch / self.chunk_size) if self.chunk_size else self.num_workers
        bounds = chunk_bounds(batch, chunks)
        result = ScoringFuture(self.name, label, bounds, self.timeout_s)
        result.set_running_or_notify_cancel()
        if not bounds:
            result.set_exception(RewardMapError(f"reward scorer {self.name!r}: empty batch"))
            return result
        futures = [self._pool.submit(self._score_chunk, images, prompts, metadata, lo, hi, result._starts, i)
                   for i, (lo, hi) in enumerate(bounds)]
        result._chunks = futures
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
        """Shut the pool down: wait for queued and running chunks, or (wait=False) cancel queued ones and
        abandon running ones (their daemon threads end with the process)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
