"""Analyses fanned out on Ray: the generic executor. With raydyn.sweep, the only module importing Ray.

It knows nothing about the math: a job (raydyn.jobs) says what the units of work
are and how to compute one; this module runs the units as Ray tasks, with
back-pressure, progress, and per-unit error capture (a failing unit is reported
by name and the others' results are kept).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray

from raydyn.errors import RaydynError


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


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
