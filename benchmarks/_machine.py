"""What the machine gave a benchmark: CPUs visible, load, and the cores its workers actually got.

Every benchmark in this folder prints, in a fixed format that ``benchmarks/run_all.py`` parses::

    machine: visible 2 CPUs, load 0.41 (1 min), 2026-12-03 12:53:37
    cores: visible 2, ray 2, workers got 1.93 (load 0.40) [probe: after ray.init]
    cores: visible 2, ray 2, workers got 1.71 (load 1.20) [timed: raydyn sweeps]
    cores: visible 2, process got 0.99 (load 0.40) [timed: bare loop]

"got" is CPU seconds divided by wall seconds: how many cores' worth of CPU the measured processes
received (on an idle machine, up to the Ray CPUs for Ray workers, or the threads used for a process).
Other load on the machine, and idle time of the benchmark itself, lower it.

- :func:`machine_line`: CPUs visible to this process, the 1-minute load average and the time.
- :func:`ray_cores_line` (Ray initialised): a probe, about one second. One task per Ray CPU spins for
  0.6 s of wall time, each measuring its own process CPU time; "workers got" is their summed CPU time
  over the wall time of the batch.
- :class:`Cores`: the cores got during a timed section (re-enterable; sections with one label add up).
  ``kind="process"``: this process (all its threads; ``time.process_time``). ``kind="children"``:
  child processes reaped during the section (``RUSAGE_CHILDREN``, e.g. a ``multiprocessing`` pool
  closed inside it). ``kind="ray"``: the Ray worker processes among this process's descendants
  (trials, actors, tasks; also those of a CLI child that runs Ray), sampled from ``/proc`` every
  0.1 s by a thread (a worker that exits loses its last < 0.1 s; Ray's daemons are not counted).
- :func:`cores_line`: the same line for figures a benchmark measured itself.
"""
from __future__ import annotations

import os
import resource
import threading
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NOT_WORKERS = ("ray::Dashboard", "ray::RuntimeEnv")  # Ray's agents: daemons, not workers


def visible_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover (no load average on this platform)
        return float("nan")


def machine_line() -> str:
    return f"machine: visible {visible_cpus()} CPUs, load {_load():.2f} (1 min), {time.strftime('%Y-%m-%d %H:%M:%S')}"


def cores_line(got: float, label: str, ray: float | None = None, who: str = "workers") -> str:
    """``cores: visible V[, ray R], <who> got G (load L) [label]``; who is "workers" or "process"."""
    ray_part = f", ray {ray:g}" if ray is not None else ""
    return f"cores: visible {visible_cpus()}{ray_part}, {who} got {got:.2f} (load {_load():.2f}) [{label}]"


def process_cores(cpu_seconds: float, wall_seconds: float, label: str) -> str:
    """The line for a section of this process: its CPU time over the section's wall time."""
    return cores_line(cpu_seconds / wall_seconds if wall_seconds > 0 else float("nan"), label, who="process")


def ray_cpus() -> float | None:
    import ray

    return ray.cluster_resources().get("CPU") if ray.is_initialized() else None


def ray_cores_line(label: str = "probe: after ray.init", spin_s: float = 0.6) -> str:
    """Probe the cores Ray's workers get now: one task per Ray CPU, each spinning ``spin_s`` of wall time."""
    import ray

    n_cpu = ray_cpus()
    n = max(1, int(n_cpu or 1))

    def spin(seconds: float) -> tuple[float, float, float]:  # nested: pickled by value, no import in the worker
        import time as _t

        w0, c0 = _t.time(), _t.process_time()
        while _t.time() - w0 < seconds:
            pass
        return w0, _t.time(), _t.process_time() - c0

    def wait(seconds: float) -> None:
        import time as _t

        _t.sleep(seconds)

    # one worker per CPU started and holding the function first, so start-up is not in the probe
    ray.get([ray.remote(num_cpus=1)(wait).remote(0.1) for _ in range(n)])
    out = ray.get([ray.remote(num_cpus=1)(spin).remote(spin_s) for _ in range(n)])
    span = max(e for _, e, _ in out) - min(s for s, _, _ in out)
    return cores_line(sum(c for _, _, c in out) / span, label, ray=n_cpu)


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, user+system ticks, comm, start time) of a process, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read().decode(errors="replace")
    except OSError:
        return None
    comm = s[s.index("(") + 1:s.rindex(")")]
    f = s[s.rindex(")") + 2:].split()
    return int(f[1]), int(f[11]) + int(f[12]), comm, int(f[19])


class _RaySampler:
    """CPU ticks of the Ray worker processes among this process's descendants, sampled by a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.desc: set[int] = {os.getpid()}  # descendants (pids), this process included
        self.known: set[int] = set()  # pids looked at (descendant or not)
        self.base: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}
        self.in_section = False

    def _tick(self) -> None:
        try:
            pids = {int(d) for d in os.listdir("/proc") if d.isdigit()}
        except OSError:
            return
        self.desc &= pids
        self.known &= pids
        new = sorted(pids - self.known)
        stats = {p: _stat(p) for p in new}
        grew = True
        while grew:  # a child may be listed before its parent
            grew = False
            for p, st in stats.items():
                if st is not None and p not in self.desc and st[0] in self.desc:
                    self.desc.add(p)
                    grew = True
        self.known.update(new)
        for p in self.desc:
            st = stats.get(p) or _stat(p)
            if st is None or not st[2].startswith("ray::") or st[2].startswith(_NOT_WORKERS):
                continue
            key = (p, st[3])
            if key not in self.base:
                self.base[key] = 0 if self.in_section else st[1]  # born during the section: all its CPU counts
            self.last[key] = st[1]

    def start(self) -> None:
        self.base, self.last = {}, {}
        self.in_section = False
        self._tick()  # every live worker's CPU so far is the base
        self.in_section = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydyn-bench-cores", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._tick()
        if not os.path.isdir("/proc"):  # not Linux: nothing to sample
            return float("nan")
        return sum(self.last[k] - self.base[k] for k in self.last) / _TICK


class Cores:
    """Cores got during a timed section: ``with meter: ...`` (repeatable), then ``print(meter.line())``."""

    def __init__(self, label: str, kind: str = "process", ray: float | None = None):
        if kind not in ("process", "children", "ray"):
            raise ValueError(f"kind {kind!r}: process, children or ray")
        self.label, self.kind, self.ray = label, kind, ray
        self.cpu = self.wall = 0.0
        self._sampler = _RaySampler() if kind == "ray" else None

    def _cpu(self) -> float:
        if self.kind == "process":
            return time.process_time()
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __enter__(self) -> "Cores":
        if self._sampler is not None:
            self._sampler.start()
        else:
            self._c0 = self._cpu()
        self._w0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w0
        self.cpu += self._sampler.stop() if self._sampler is not None else self._cpu() - self._c0

    @property
    def got(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else float("nan")

    def line(self) -> str:
        ray = self.ray
        if self.kind == "ray" and ray is None:
            try:
                ray = ray_cpus()
            except ImportError:
                ray = None
        return cores_line(self.got, f"timed: {self.label}", ray=ray if self.kind == "ray" else None,
                          who="process" if self.kind == "process" else "workers")


# ----------------------------------------------------------------------------- 2-core scaling
def _numpy_kernel(reps: int = 4000) -> float:
    """Small dense linear algebra, as in an HMM fit (6x6 Cholesky and triangular solves), 1 BLAS thread."""
    from threadpoolctl import threadpool_limits
    import numpy as np

    rng = np.random.default_rng(0)
    a, x = rng.standard_normal((6, 6)), rng.standard_normal((800, 6))
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ a.T + np.eye(6)
            np.linalg.solve(np.linalg.cholesky(c), x.T)
        return time.perf_counter() - t0


def _torch_kernel(reps: int = 4000) -> float:
    """Batched matrix products at one torch thread, as in a vectorised population step."""
    import torch

    torch.set_num_threads(1)
    w, x = torch.randn(32, 64, 64), torch.randn(32, 64, 64)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.bmm(x, w).relu_()
    return time.perf_counter() - t0


def scaling_line(repeats: int = 3) -> str:
    """How much work 2 processes at once do against one alone, on two fixed single-threaded kernels
    (median of ``repeats``, solo and pair alternated): the most a 2-core fan-out can gain on this machine
    (2.00 where the two cores do not slow each other). About 10 s.

    ``scaling: 2 processes at once do 1.85x (numpy 6x6 linear algebra), 2.02x (torch bmm) the work of one
    alone, median of 3 (...)``"""
    import multiprocessing as mp
    import statistics

    if visible_cpus() < 2:
        return "scaling: 1 CPU visible, no 2-process figure"
    out = []
    with mp.get_context("spawn").Pool(2) as pool:
        for name, fn in (("numpy 6x6 linear algebra", _numpy_kernel), ("torch bmm", _torch_kernel)):
            pool.map(fn, [50, 50])  # imports and first calls, in both workers
            ratios = []
            for _ in range(repeats):
                solo = pool.apply(fn)
                pair = [r.get() for r in [pool.apply_async(fn) for _ in range(2)]]
                ratios.append(2 * solo / max(pair))
            out.append(f"{statistics.median(ratios):.2f}x ({name})")
    return ("scaling: 2 processes at once do " + ", ".join(out) + " the work of one alone, median of "
            f"{repeats} (the most a 2-core fan-out can gain here; load {_load():.2f})")
