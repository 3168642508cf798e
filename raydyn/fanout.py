"""Analyses fanned out on Ray: the generic executor. With raydyn.sweep, the only module importing Ray.

It knows nothing about the math: a job (raydyn.jobs) says what the units of work
are and how to compute one; this module runs the units as Ray tasks, with
back-pressure, progress, and per-unit error capture (a failing unit is reported
by name and the others' results are kept).
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import ray

from raydyn.errors import RaydynError

__all__ = ["map_tasks", "TaskOutcome", "pairwise_distance_matrix"]


@dataclass
class TaskOutcome:
    index: int
    value: Any = None
    error: str | None = None


def _require_ray() -> None:
    if not ray.is_initialized():
        raise RaydynError("Ray is not initialised: call raydyn.sweep.ensure_ray() (or ray.init) first")


def _call(fn: Callable, payload: Any, shared: Any) -> tuple[Any, str | None]:
    try:
        return fn(payload, shared), None
    except Exception as e:  # reported with the unit's name by the caller
        return None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def _caller(fn: Callable) -> Callable:
    """The task body: ``_call`` on each payload of a batch, with ``fn`` bound, so a Ray remote
    function made of it is pickled and shipped to each worker once (a worker caches the functions it
    has run), not with every task as an argument. Returns the (value, error) pairs and the seconds
    the batch took."""

    def call(payloads: list, shared: Any) -> tuple[list[tuple[Any, str | None]], float]:
        t0 = time.perf_counter()
        out = [_call(fn, payload, shared) for payload in payloads]
        return out, time.perf_counter() - t0

    return call


_BATCH_TARGET_S = 1.0  # automatic batches: about this long (Ray's own cost is ~2-5 ms of CPU a task)
_BATCH_MAX = 16


def _auto_batch(remaining: int, slots: int, seconds_per_payload: float | None) -> int:
    """Payloads in the next task: one until a task's duration is known; then as many as take about
    ``_BATCH_TARGET_S`` (so short units do not pay Ray's per-task cost each, and long ones go alone),
    at most ``_BATCH_MAX``, and few enough that the last eighth of the work still goes one by one."""
    if seconds_per_payload is None:
        return 1
    by_time = int(_BATCH_TARGET_S / max(seconds_per_payload, 1e-6))
    return max(1, min(by_time, remaining // (8 * slots), _BATCH_MAX))


def map_tasks(
    fn: Callable[[Any, Any], Any],
    payloads: Sequence[Any],
    *,
    shared: Any = None,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    order: Sequence[int] | None = None,
    batch: int | None = None,
) -> list[TaskOutcome]:
    """Run ``fn(payload, shared)`` for every payload on Ray tasks; results in payload order.

    ``shared`` is put in the object store once and passed by reference to every task.
    At most ``max_in_flight`` tasks are submitted at a time (default: 2 x cluster CPUs),
    so a driver with 100,000 units does not hold 100,000 futures. ``progress(done,
    total, failed)`` is called as payloads finish. ``order``: the payload indices in the
    order to submit them (a permutation of ``range(len(payloads))``; default: as given);
    longest first keeps the last tasks from running on one core alone while the others
    idle. The outcomes are in payload order either way.

    ``batch``: payloads per task. Default (None): one per task at first, then, once tasks'
    durations are known, as many as take about a second (short payloads then do not each
    pay Ray's few milliseconds of per-task work), one by one again near the end. Each payload's
    error is still its own; a worker that dies fails every payload of its task.
    """
    _require_ray()
    n = len(payloads)
    if order is None:
        order = range(n)
    elif sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}) (the payload indices)")
    if batch is not None and (isinstance(batch, bool) or int(batch) != batch or batch < 1):
        raise ValueError(f"batch must be None or an int >= 1, got {batch!r}")
    remote = ray.remote(num_cpus=num_cpus)(_caller(fn))
    shared_ref = ray.put(shared)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-9)))
    cap = max_in_flight or max(2, 2 * slots)
    outcomes = [TaskOutcome(i) for i in range(n)]
    pending: dict[Any, list[int]] = {}
    nxt = done = failed = 0
    per_payload: float | None = None  # seconds a payload takes (moving average over tasks)
    while nxt < n or pending:
        while nxt < n and len(pending) < cap:
            b = int(batch) if batch is not None else _auto_batch(n - nxt, slots, per_payload)
            idx = [order[k] for k in range(nxt, min(n, nxt + b))]
            pending[remote.remote([payloads[i] for i in idx], shared_ref)] = idx
            nxt += len(idx)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            idx = pending.pop(ref)
            try:
                results, seconds = ray.get(ref)
                per = seconds / len(idx)
                per_payload = per if per_payload is None else 0.5 * (per_payload + per)
            except Exception as e:  # the worker died (node lost, OOM): report, keep going
                results = [(None, f"{type(e).__name__}: {e}")] * len(idx)
            for i, (value, err) in zip(idx, results):
                outcomes[i].value, outcomes[i].error = value, err
                done += 1
                failed += err is not None
                if progress:
                    progress(done, n, failed)
    return outcomes


# ------------------------------------------------------------------ pairwise distances (Koopman)
def _kp():
    from raydyn.analysis.koopman import distances

    return distances


_PAIRS_PER_TASK = 65536  # default task size cap: ~0.1 s of the compiled kernel for 10 eigenvalues


def _pair_range(n: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the pairs start..stop-1 of the upper triangle i < j of n spectra, in row-major order."""
    k = np.arange(start, stop, dtype=np.int64)
    rows = np.arange(n, dtype=np.int64)
    first = rows * (2 * n - rows - 1) // 2  # flat index of the pair (i, i + 1)
    i = np.searchsorted(first, k, side="right") - 1
    return i, k - first[i] + i + 1


def _pairs_task(shared: tuple, start: int, stop: int) -> np.ndarray:
    """One unit of the fan-out: W_p of the upper-triangle pairs start..stop-1."""
    packed, n, p, periods = shared
    i, j = _pair_range(n, start, stop)
    return _kp()._pair_values(packed, i, j, p, periods)


_pairs_remote = ray.remote(num_cpus=1)(_pairs_task)


def _default_n_actors() -> int:
    return max(1, int(ray.available_resources().get("CPU", 0)))


def pairwise_distance_matrix(
    spectra: Sequence[np.ndarray],
    p: float = 1,
    block_size: int | None = None,
    n_actors: int | None = None,
    imag_period=None,
) -> np.ndarray:
    """Symmetric (N, N) matrix of Wasserstein-p distances between spectra, as Ray tasks.

    The spectra, validated and packed by length, go into the object store once; the
    N (N - 1) / 2 pairs i < j, in row-major order, are cut into equal contiguous ranges,
    each one Ray task (1 CPU) on the already started worker pool, computed with the kernel of
    :func:`raydyn.analysis.koopman.distances.pairwise_wasserstein`; a task returns the
    distances of its range only (8 bytes a pair) and the driver fills both triangles.
    Equals ``pairwise_wasserstein(spectra, p, imag_period=imag_period)`` exactly (same
    kernel, pair by pair). Ray must already be initialised.

    (Tasks rather than actors holding the spectra: a fresh actor is a fresh worker process
    that starts and imports numpy, scipy and raydyn before its first block, ~0.8 s of CPU
    each, on the critical path of every call; the pool's workers import once per session.)

    Parameters
    ----------
    spectra : list of N (n_k,) complex arrays
    p : Wasserstein order >= 1
    block_size : a task computes ``block_size ** 2`` pairs (a block of that many spectra a
        side); default: at least 8 tasks per parallel task slot and at most 65,536 pairs a task
    n_actors : the most tasks run at once (each takes 1 CPU); default: one per available CPU
    imag_period : None, a float, or N floats: imaginary parts compared modulo the period
        (continuous-time spectra: 2 pi / dt), as in ``pairwise_wasserstein``
    """
    _require_ray()
    kp = _kp()
    p = kp._check_p(p)
    spectra = kp._as_spectra_list(spectra, "spectra")
    n = len(spectra)
    periods = kp._periods(imag_period, n)
    if n < 2:
        return np.zeros((n, n))
    if n_actors is None:
        n_actors = _default_n_actors()
    if isinstance(n_actors, bool) or int(n_actors) != n_actors or n_actors < 1:
        raise ValueError(f"n_actors must be an int >= 1, got {n_actors!r}")
    if block_size is not None and (isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    n_pairs = n * (n - 1) // 2
    if block_size is None:
        per_task = math.ceil(n_pairs / max(8 * int(n_actors), math.ceil(n_pairs / _PAIRS_PER_TASK)))
    else:
        per_task = int(block_size) ** 2
    starts = list(range(0, n_pairs, per_task))

    shared = ray.put((kp._Packed(spectra), n, p, periods))
    # all tasks at once when they may use every CPU (Ray runs as many as there are CPUs, and a
    # worker starts its next task without a round trip to this driver); else n_actors at a time
    cap = len(starts) if n_actors >= ray.cluster_resources().get("CPU", 1) else int(n_actors)
    vals = np.empty(n_pairs)
    pending: dict[Any, int] = {}
    nxt = 0
    while nxt < len(starts) or pending:
        while nxt < len(starts) and len(pending) < cap:
            a = starts[nxt]
            pending[_pairs_remote.remote(shared, a, min(a + per_task, n_pairs))] = a
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            a = pending.pop(ref)
            v = ray.get(ref)
            vals[a : a + v.size] = v
    out = np.zeros((n, n))
    upper = ~np.tri(n, dtype=np.bool_)  # i < j, row-major: the order of the pairs
    out[upper] = vals
    out.T[upper] = vals
    return out
