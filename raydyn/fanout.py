"""Analyses fanned out on Ray: the generic executor. With raydyn.sweep, the only module importing Ray.

It knows nothing about the math: a job (raydyn.jobs) says what the units of work
are and how to compute one; this module runs the units as Ray tasks, with
back-pressure, progress, and per-unit error capture (a failing unit is reported
by name and the others' results are kept).
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import ray
from ray.util import ActorPool

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


def map_tasks(
    fn: Callable[[Any, Any], Any],
    payloads: Sequence[Any],
    *,
    shared: Any = None,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[TaskOutcome]:
    """Run ``fn(payload, shared)`` for every payload as a Ray task; results in payload order.

    ``shared`` is put in the object store once and passed by reference to every task.
    At most ``max_in_flight`` tasks are submitted at a time (default: 2 x cluster CPUs),
    so a driver with 100,000 units does not hold 100,000 futures. ``progress(done,
    total, failed)`` is called as tasks finish.
    """
    _require_ray()
    remote = ray.remote(num_cpus=num_cpus)(_call)
    shared_ref = ray.put(shared)
    cap = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / max(num_cpus, 1e-9)))
    outcomes = [TaskOutcome(i) for i in range(len(payloads))]
    pending: dict[Any, int] = {}
    nxt = done = failed = 0
    while nxt < len(payloads) or pending:
        while nxt < len(payloads) and len(pending) < cap:
            pending[remote.remote(fn, payloads[nxt], shared_ref)] = nxt
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            try:
                value, err = ray.get(ref)
            except Exception as e:  # the worker died (node lost, OOM): report, keep going
                value, err = None, f"{type(e).__name__}: {e}"
            outcomes[i].value, outcomes[i].error = value, err
            done += 1
            failed += err is not None
            if progress:
                progress(done, len(payloads), failed)
    return outcomes


# ------------------------------------------------------------------ pairwise distances (Koopman)
def _kp():
    from raydyn.analysis.koopman import distances

    return distances


@ray.remote(num_cpus=1)
class _WassersteinWorker:
    """Holds all spectra (zero-copy views of one packed array) and computes blocks."""

    def __init__(self, packed: tuple[np.ndarray, np.ndarray], p: float, periods: np.ndarray | None = None):
        values, offsets = packed
        self._spectra = [values[offsets[k] : offsets[k + 1]] for k in range(offsets.size - 1)]
        self._p = p
        self._periods = periods

    def block(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
        r0, r1 = rows
        c0, c1 = cols
        per = self._periods
        if rows == cols:
            out = _kp().pairwise_wasserstein(self._spectra[r0:r1], p=self._p,
                                             imag_period=None if per is None else per[r0:r1])
        else:
            out = _kp().wasserstein_block(self._spectra[r0:r1], self._spectra[c0:c1], p=self._p,
                                          imag_period=None if per is None else np.concatenate([per[r0:r1], per[c0:c1]]))
        return rows, cols, out


def _default_n_actors() -> int:
    return max(1, int(ray.available_resources().get("CPU", 0)))


def pairwise_distance_matrix(
    spectra: Sequence[np.ndarray],
    p: float = 1,
    block_size: int | None = None,
    n_actors: int | None = None,
    imag_period=None,
) -> np.ndarray:
    """Symmetric (N, N) matrix of Wasserstein-p distances between spectra, on Ray actors.

    The spectra go into the object store once (one packed complex array plus
    offsets); ``n_actors`` actors (default: one per available CPU) each hold a
    reference and compute upper-triangle blocks (block i <= block j) with
    :func:`raydyn.analysis.koopman.distances.pairwise_wasserstein` (diagonal blocks) and
    :func:`raydyn.analysis.koopman.distances.wasserstein_block` (off-diagonal ones).
    Equals ``pairwise_wasserstein(spectra, p, imag_period=imag_period)``. Ray must already be initialised.

    Parameters
    ----------
    spectra : list of N (n_k,) complex arrays
    p : Wasserstein order >= 1
    block_size : spectra per block side; default gives at least ~8 blocks per actor
    n_actors : number of actors (each takes 1 CPU)
    imag_period : None, a float, or N floats: imaginary parts compared modulo the period
        (continuous-time spectra: 2 pi / dt), as in ``pairwise_wasserstein``
    """
    _require_ray()
    p = _kp()._check_p(p)
    spectra = _kp()._as_spectra_list(spectra, "spectra")
    n = len(spectra)
    periods = _kp()._periods(imag_period, n)
    if n < 2:
        return np.zeros((n, n))
    if n_actors is None:
        n_actors = _default_n_actors()
    if isinstance(n_actors, bool) or int(n_actors) != n_actors or n_actors < 1:
        raise ValueError(f"n_actors must be an int >= 1, got {n_actors!r}")
    if block_size is None:
        k = 1
        while k * (k + 1) // 2 < 8 * n_actors:
            k += 1
        block_size = max(32, math.ceil(n / k))
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    edges = list(range(0, n, int(block_size))) + [n]
    spans = [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)]
    tasks = [(spans[a], spans[b]) for a in range(len(spans)) for b in range(a, len(spans))]

    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([s.size for s in spectra])
    ref = ray.put((np.concatenate(spectra), offsets))
    workers = [_WassersteinWorker.remote(ref, p, periods) for _ in range(min(int(n_actors), len(tasks)))]
    out = np.zeros((n, n))
    try:
        pool = ActorPool(workers)
        for (r0, r1), (c0, c1), block in pool.map_unordered(lambda w, t: w.block.remote(*t), tasks):
            out[r0:r1, c0:c1] = block
            out[c0:c1, r0:r1] = block.T
    finally:
        for w in workers:
            ray.kill(w)
    return out
