"""Sweeps on Ray Tune. With raydyn.fanout, the only module that imports Ray.

One Tune trial trains one *population* (runs vectorised together, see
:mod:`raydyn.train.population`) and writes its runs to the raydyn store itself;
Tune's own result files are bookkeeping. Resume is the store's job: run ids are
hashes of run configs, so a re-run of ``sweep run`` skips every run already in
the store and trains only the rest. Within one ``sweep run``, a trial that Tune
retries (its node or worker died) resumes from its last population checkpoint
(``train.checkpoint_every``), saved through Tune's checkpoint API.

Tune sees only population ids (``param_space``); the populations themselves go to
the trials once through the object store, so Tune's per-trial bookkeeping (configs
in results, experiment state) does not grow with the number of runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# Tune's own console tables are replaced by raydyn's progress line (verbose=0 + the legacy
# output engine is silent; the new engine still prints a configuration box).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C stops a sweep at once (KeyboardInterrupt out of tuner.fit); Tune's own handler would
# instead wind the experiment down and return as if it had finished. Resume is the store's job.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
# Tune snapshots its (small: population ids only) experiment state whenever a trial checkpoints,
# and warns about it; raydyn's checkpoints are spaced by train.checkpoint_every/checkpoint_minutes already.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402

from raydyn.errors import RaydynError  # noqa: E402
from raydyn.preflight import root_cause  # noqa: E402  (re-exported: raydyn.sweep.root_cause)
from raydyn.spec import PopulationSpec, RunConfig, SweepSpec, populations, sweep_hash  # noqa: E402
from raydyn.store import Store  # noqa: E402


# ----------------------------------------------------------------------------- Ray
#: Seconds to wait for a TCP connection to --address before calling it unreachable
#: (Ray itself retries an unreachable GCS for minutes).
CONNECT_TIMEOUT_S = float(os.environ.get("RAYDYN_CONNECT_TIMEOUT_S", "10"))


def _check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens at ``[ray://]host:port``."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise RaydynError(
                f"--address {address!r}: a ray:// address is Ray Client, which needs the grpcio package; it is not "
                "installed. Install it with: pip install 'ray[client]==2.60.0' -- or, on a machine inside the "
                "cluster, give the head's GCS address (host:6379), or submit the sweep with `ray job submit` "
                "(deploy/README.md)")
    hostport = address.split("://", 1)[1] if "://" in address else address
    hostport = hostport.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RaydynError(f"--address {address!r}: expected host:port (a Ray GCS address) or ray://host:port "
                          "(Ray Client), e.g. 10.0.0.5:6379 or ray://head:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RaydynError(f"could not connect to the Ray cluster at --address {address!r}: {reason} "
                          f"(waited {CONNECT_TIMEOUT_S:g} s; is the head node running, and the port open?)") from None


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts inside this block, it binds every port to 127.0.0.1.

    On Linux Ray 2.60 replaces a loopback node address by the machine's routable one and its
    GCS, raylet and workers then listen on all interfaces. With its multi-node mode off (the
    mode Ray runs in on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) the node
    address stays 127.0.0.1 and every server listens there. The driver reads the setting at
    import, so it is flipped for the driver too; both are restored afterwards, so a later
    connection to a real cluster from this process is unaffected.
    """
    from ray._private import ray_constants  # the flag has no public setter

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    env_before, flag_before = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False  # child processes read the variable
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag_before
        if env_before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = env_before


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Environment variables set inside this block only."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- Ray's log
_WARNING_LINE = re.compile(r"^\S.*:\d+: (\w*Warning): (.*)$")  # Python's warnings.showwarning format
_routing: dict[str, Any] = {"path": None, "handler": None, "shown": set(), "warn": None, "removed": []}


def log_path(store: Store, name: str) -> Path:
    """Where a command's Ray log goes: ``<store>/logs/<name>-<time>.log`` for a local store, else the
    system's temporary folder (the store may be an object store)."""
    local = store.local_path()
    folder = Path(local) / "logs" if local else Path(tempfile.gettempdir()) / "raydyn-logs"
    return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def route_ray_logs(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """Send Ray's own log to the file ``path`` instead of the terminal, for the rest of the process.

    That is the driver's ``ray`` loggers (start-up notices such as the token-authentication one, Tune's
    trial-failure tracebacks) and what workers write to stderr; workers' stdout (a plug-in's ``print``)
    still reaches the terminal. A Python warning a worker prints (e.g. raydyn's NotVectorisedWarning) is
    passed to ``warn`` once per distinct message (default: printed as ``warning: ...``). Returns the path.
    """
    path = Path(path)
    from ray._private import log as ray_log

    ray_log.generate_logging_config()  # Ray's own handlers exist from here on, so they can be replaced
    logger = logging.getLogger("ray")
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s:%(lineno)s -- %(message)s"))
    for h in list(logger.handlers):
        if isinstance(h, logging.StreamHandler):  # Ray's console handler, or the file of an earlier command
            logger.removeHandler(h)
            if h is not _routing["handler"]:
                _routing["removed"].append(h)  # put back by unroute_ray_logs
            else:
                h.close()
    logger.addHandler(handler)
    _routing.update(path=path, handler=handler, warn=warn, shown=set())  # each command shows its warnings once
    if ray.is_initialized():
        _route_worker_streams()
    return path


def current_log() -> Path | None:
    """The file Ray's log goes to now (:func:`route_ray_logs`), or None."""
    return _routing["path"]


class _LazyFileHandler(logging.FileHandler):
    """A log file created with its folder on the first record (a command that fails before Ray writes nothing);
    when that folder cannot be written (a read-only store), the file goes to the temporary folder instead."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            return super()._open()
        except OSError:
            fallback = Path(tempfile.gettempdir()) / "raydyn-logs" / Path(self.baseFilename).name
            fallback.parent.mkdir(parents=True, exist_ok=True)
            self.baseFilename = str(fallback)
            _routing["path"] = fallback
            return super()._open()


def unroute_ray_logs() -> None:
    """Undo :func:`route_ray_logs`: Ray's log and workers' output go to the terminal again."""
    logger = logging.getLogger("ray")
    if _routing["handler"] is not None:
        logger.removeHandler(_routing["handler"])
        _routing["handler"].close()
    for h in _routing["removed"]:
        logger.addHandler(h)
    _routing.update(path=None, handler=None, warn=None, removed=[])
    try:
        import functools

        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if "raydyn_print_logs" in [name for name, _ in dispatcher.handlers]:
        dispatcher.remove_handler("raydyn_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(
            ray_worker.print_to_stdstream,
            ignore_prefix=ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)))


def _route_worker_streams() -> None:
    """Replace Ray's printer of worker output (private API: left as it is if Ray changed it)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    names = [name for name, _ in dispatcher.handlers]
    if "ray_print_logs" not in names and "raydyn_print_logs" not in names:
        return  # log_to_driver=False: nothing is printed anyway
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raydyn_print_logs")
    dispatcher.add_handler("raydyn_print_logs", _worker_lines)


def _worker_lines(data: dict[str, Any]) -> None:
    lines = data.get("lines") or []
    who = f"({data.get('task_name') or data.get('actor_name') or 'worker'} pid={data.get('pid')})"
    if not data.get("is_err") and isinstance(data.get("pid"), int):  # a worker's print (not Ray's autoscaler)
        for ln in lines:
            print(f"{who} {ln}", file=sys.stdout)
        return
    handler = _routing["handler"]
    for ln in lines:
        m = _WARNING_LINE.match(ln)
        if m and m.group(2) not in _routing["shown"]:
            _routing["shown"].add(m.group(2))
            (_routing["warn"] or (lambda msg: print(f"warning: {msg}", file=sys.stderr)))(m.group(2))
        if handler is not None:
            handler.emit(logging.LogRecord("ray.worker", logging.INFO, "", 0, f"{who} {ln}", None, None))


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to ``address`` (or $RAY_ADDRESS), or start an embedded local Ray.

    The embedded Ray is always a new instance (``address="local"``): it never joins a
    cluster it happens to find on the machine. It runs without a dashboard, with Ray's
    token authentication (Ray's default for local instances), and every port it opens
    listens on 127.0.0.1 only (:func:`_loopback_only`). A SIGTERM handler installed by
    the caller (the CLI's) survives ``ray.init``.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, TimeoutError, ValueError depending on the failure
            raise RaydynError(f"could not connect to the Ray cluster at --address {address!r}: {e}") from None
    else:
        # Ray starts workers at niceness 15; on a shared machine they then lose the CPU to anything
        # else running, and a sweep crawls. Trials are the work here: run them at normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        with _loopback_only():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", **kwargs)
    if main and callable(previous):  # ray.init replaces SIGTERM with a bare sys.exit
        signal.signal(signal.SIGTERM, previous)
    if _routing["path"] is not None:
        _route_worker_streams()


def check_resources(spec: SweepSpec) -> None:
    """Fail before any training when a trial asks for more than the cluster has."""
    res = ray.cluster_resources()
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if gpu > 0 and res.get("GPU", 0) < gpu:
        raise RaydynError(
            f"resources.gpu: each trial asks for {gpu:g} GPU but the Ray cluster has {res.get('GPU', 0):g}; "
            "set resources.gpu: 0 to train on CPU"
        )
    if res.get("CPU", 0) < cpu:
        raise RaydynError(
            f"resources.cpu: each trial asks for {cpu:g} CPUs but the Ray cluster has {res.get('CPU', 0):g}"
        )


# ----------------------------------------------------------------------------- trial
def _objective(values: list[float], goal: str) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 1e30 if goal == "minimize" else -1e30
    return sum(finite) / len(finite)


def _quiet_exit_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` of trial workers: when Ray stops a worker (the driver was interrupted), the
    SystemExit/KeyboardInterrupt it raises can land in a weakref callback, which Python prints as an
    "Exception ignored in ..." traceback that Ray forwards to the driver's terminal. Those are the stop
    itself, not an error; anything else is printed as Python would."""
    if isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def population_trial(config: dict[str, Any], store_uri: str, sweep: str, spec_text: str | None = None,
                     populations_by_id: dict[str, dict[str, Any]] | None = None, checkpoint_every: int | None = 0,
                     device: str = "auto", base_dir: str | None = None,
                     plugin_paths: list[str] | None = None, checkpoint_minutes: float = 5.0,
                     rung_board: Any = None) -> None:
    """Tune function trainable: train one population and write it to the store.

    ``config`` holds either a population id (grid/random; the population is looked
    up in ``populations_by_id``) or, for optuna, a point of the search space that is
    crossed with the sweep's seeds here. Every ``checkpoint_every`` steps the full
    training state is reported as a Tune checkpoint; a retried trial resumes from
    the last one (``resumed_from`` in its results says where). ``device``: ``train.device``;
    ``base_dir``: what relative data paths are relative to (the driver's directory). ``rung_board``: an
    optuna sweep with ``train.early_stop``: the actor (:class:`RungBoard`) that prunes a trial at a rung;
    a pruned trial writes its runs with status ``stopped`` and reports ``pruned``.
    """
    import pyarrow as pa
    import torch

    from raydyn.spec import parse_sweep
    from raydyn.store import open_store
    from raydyn.tasks import registry
    from raydyn.train.checkpoint import PopulationCheckpoint
    from raydyn.train.population import train_population
    from raydyn.train.recorder import runs_table

    from raydyn.tasks.plugins import add_search_path

    add_search_path(*(plugin_paths or []), base_dir)  # the driver's plug-in folders, on this worker too
    sys.unraisablehook = _quiet_exit_unraisable  # a stopped sweep's workers: no "Exception ignored" tracebacks
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint otherwise
    ctx = tune.get_context()
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1) if ctx else 1
    torch.set_num_threads(max(1, int(cpus)))
    origin = config.get("origin", "optuna")
    if "population" in config:
        pop = PopulationSpec.from_dict((populations_by_id or {})[config["population"]])
        goal, metric = "minimize", None
    else:  # optuna: the searcher proposed a point
        spec = parse_sweep(spec_text or "", sweep)
        point = {k: v for k, v in config.items()}
        seeds = spec.parameters["seed"].listed() if "seed" in spec.parameters else [spec.train.seed]
        members = [spec.run_config({**point, "seed": s}) for s in seeds]
        pop = populations(members, len(members))[0]
        goal, metric = spec.goal, spec.metric
    n = len(pop.members)
    node = ray.get_runtime_context().get_node_id()
    store = open_store(store_uri)

    resume = None
    last = tune.get_checkpoint()
    if last is not None:  # Tune retried this trial: continue where its last checkpoint left off
        with last.as_directory() as d:
            resume = PopulationCheckpoint.load(d)
    resumed_from = resume.step if resume is not None else 0
    base = {"members": n, "node": node, "resumed_from": resumed_from}

    reported = {"t": 0.0, "diverged": 0}

    def on_record(step: int, active: int, diverged: int) -> None:
        # progress only: at most every 2 s (or when a run diverges), a report costs ~ms of Tune bookkeeping
        now = time.monotonic()
        if now - reported["t"] < 2.0 and diverged == reported["diverged"]:
            return
        reported.update(t=now, diverged=diverged)
        tune.report({**base, "step": step, "active": active, "diverged": diverged, "pop_done": 0})

    def on_checkpoint(ckpt: PopulationCheckpoint) -> None:
        ckpt.meta["node"] = node  # provenance: which node wrote it
        with tempfile.TemporaryDirectory(prefix="raydyn-ckpt-") as d:
            ckpt.save(d)  # tune.report copies it to the trial's storage before returning
            tune.report({**base, "step": ckpt.step, "checkpoint_step": ckpt.step, "pop_done": 0},
                        checkpoint=tune.Checkpoint.from_directory(d))

    # Optuna's searcher expects its objective in every result: only the final report there
    # (so no progress reports and no checkpoints for Optuna trials), and a report at each early-stopping rung
    def ask_board(step: int, value: float) -> bool:
        tune.report({**base, "step": step, "objective": value, "rung": step, "pop_done": 0})  # Optuna: intermediate
        return bool(ray.get(rung_board.report.remote(step, value)))

    prune = ask_board if metric and rung_board is not None else None
    if registry.model(pop.shared["model"]).trainer == "dynamics":  # optimisers as dynamical systems: no network
        from raydyn.train.dynamics import train_dynamics

        result = train_dynamics(pop, on_record=None if metric else on_record)
    else:
        result = train_population(pop, on_record=None if metric else on_record,
                                  checkpoint_every=0 if metric else (checkpoint_every or 0),
                                  checkpoint_seconds=None if (metric or checkpoint_every is not None)
                                  else 60.0 * checkpoint_minutes,
                                  on_checkpoint=on_checkpoint, resume=resume, device=device, base_dir=base_dir,
                                  prune=prune)
    t_tables = time.perf_counter()
    runs = runs_table(result, pop.pop_id, node=node)
    runs = runs.append_column("origin", pa.array([origin] * runs.num_rows, pa.string()))  # grid|random|refine|optuna
    tables = dict(metrics=result.recorder.metrics_table(), weights=result.recorder.weights_table(),
                  extra=result.recorder.extra_tables())
    t_write = time.perf_counter()
    store.write_runs(sweep, pop.pop_id, runs=runs, **tables)
    diverged = sum(m.status == "diverged" for m in result.members)
    stopped = sum(m.status == "stopped" for m in result.members)
    # where a trial's time went (summed over trials in SweepOutcome.phase_s): training (incl. recording and
    # checkpoints), building its Arrow tables, writing them to the store
    final: dict[str, Any] = {**base, "step": int(pop.shared["steps"]), "active": n - diverged,
                             "diverged": diverged, "pop_done": 1, "t_train": result.wall_time_s,
                             "t_tables": t_write - t_tables, "t_write": time.perf_counter() - t_write,
                             "stopped": stopped}
    if metric and prune is not None:
        final["pruned"] = stopped > 0 and stopped + diverged == n  # the searcher records the trial as pruned
    if metric:
        final["objective"] = _objective(runs.column(metric).to_pylist() if metric in runs.column_names else [], goal)
    tune.report(final)


# ----------------------------------------------------------------------------- progress
class _Progress(tune.Callback):
    """Turns Tune's per-trial results into runs done/total, diverged, elapsed."""

    def __init__(self, total: int, update: Callable[[dict[str, Any]], None]):
        self.total, self.update = total, update
        self.done = self.diverged = self.failed = self.retried = self.stopped = 0
        self.failures: dict[str, list[str]] = {}  # trial name -> root cause of each failed attempt
        self.phase_s: dict[str, float] = {}
        self.t0 = time.time()

    def __getstate__(self):  # Tune pickles callbacks with its experiment state; the live display stays here
        state = self.__dict__.copy()
        state["update"] = None
        return state

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("pop_done"):
            self._emit()
            return
        self.done += int(result["members"])
        self.diverged += int(result["diverged"])
        self.stopped += int(result.get("stopped", 0))
        for k in ("t_train", "t_tables", "t_write"):
            self.phase_s[k[2:]] = self.phase_s.get(k[2:], 0.0) + float(result.get(k, 0.0))
        self._emit()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._note_failure(trial)
        self._emit()

    def on_trial_recover(self, iteration, trials, trial, **info):  # failed, and Tune retries it
        self.retried += 1
        self._note_failure(trial)
        self._emit()

    def _note_failure(self, trial) -> None:
        """The root cause of the trial's latest failure, from Tune's error file (one block per failure)."""
        cause = "unknown error (Tune wrote no error file)"
        try:
            with open(trial.error_file, encoding="utf-8", errors="replace") as f:
                blocks = re.split(r"^Failure # \d+ \(occurred at [^)]*\)$", f.read(), flags=re.M)
            if blocks and blocks[-1].strip():
                cause = root_cause(blocks[-1])
        except (OSError, TypeError):
            pass
        self.failures.setdefault(_trial_name(trial), []).append(cause)

    def _emit(self) -> None:
        if self.update is None:
            return
        self.update({"done": self.done, "total": self.total, "diverged": self.diverged,
                     "failed": self.failed, "retried": self.retried, "elapsed": time.time() - self.t0})


# ----------------------------------------------------------------------------- sweeps
@dataclass
class SweepOutcome:
    name: str
    total: int
    skipped: int
    trained: int
    diverged: int
    failed_populations: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=dict)  # trial seconds summed: train, tables, write
    grown: list[str] = field(default_factory=list)  # the sweep file grew the stored grid: keys that differ
    failures: dict[str, list[str]] = field(default_factory=dict)  # failed trial -> root cause of each attempt
    stopped: int = 0  # runs that train.early_stop ended at a rung (or Optuna pruned)



def failure_report(failed: list[str], failures: dict[str, list[str]]) -> list[str]:
    """One paragraph per distinct root cause of the ``failed`` trials, not one traceback per attempt;
    ``failures``: trial -> root cause of each of its failed attempts (:class:`_Progress` collects them)."""
    by_cause: dict[str, list[tuple[str, int]]] = {}
    for trial in failed:
        causes = failures.get(trial) or ["unknown error"]
        by_cause.setdefault(causes[-1], []).append((trial, len(causes)))
    out = []
    for cause, trials in by_cause.items():
        attempts = sorted({n for _, n in trials})
        same = all(len(set(failures.get(t) or [cause])) == 1 for t, _ in trials)
        tries = f"{attempts[0]}" if len(attempts) == 1 else f"{attempts[0]}-{attempts[-1]}"
        names = ", ".join(t for t, _ in trials[:5]) + (f" and {len(trials) - 5} more" if len(trials) > 5 else "")
        head = (f"{len(trials)} trial(s) failed ({names}), "
                + (f"with the same error on each of {tries} attempt(s)" if same else f"after {tries} attempt(s)")
                + f": {cause}")
        if same and max(attempts) > 1:
            head += (". An error that repeats on every attempt is in the model, the data or the sweep file, "
                     "not in the cluster: fix it, then run the same command to train the remaining runs")
        out.append(head)
    return out


def _tune_storage(store: Store) -> tuple[str | None, Any]:
    """Tune's bookkeeping and trial checkpoints go under <store>/_tune, on the store's filesystem.

    Every node must see a retried trial's checkpoint, and every node sees the store.
    """
    local = store.local_path()
    if local:
        return str(Path(local) / "_tune"), None
    return store.path("_tune"), store.filesystem


@dataclass
class SweepGrowth:
    """How a changed sweep file compares with the one stored under its name (:func:`sweep_growth`)."""

    differences: list[str]  # every key that differs, as `key.path: stored -> this file`
    refused: list[str]  # why the file does not only grow the stored grid; empty: it does
    old_runs: int = 0  # runs of the stored file
    new_runs: int = 0  # runs of this file (the stored ones among them)


def _show(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list, str)) else str(v)


def key_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``key.path: old -> new`` for every key whose value differs between two parsed YAML documents
    (a key one of them lacks shows as ``(not set)``; 1 and 1.0 differ, as they do in the sweep hash)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in new:
                out.append(f"{sub}: {_show(old[k])} -> (not set)")
            elif k not in old:
                out.append(f"{sub}: (not set) -> {_show(new[k])}")
            else:
                out += key_differences(old[k], new[k], sub)
        return out
    same = old == new and type(old) is type(new) and json.dumps(old, sort_keys=True, default=str) == \
        json.dumps(new, sort_keys=True, default=str)
    return [] if same else [f"{path or '(whole file)'}: {_show(old)} -> {_show(new)}"]


def _same_value(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _setting(cfg: dict[str, Any], param: str) -> Any:
    """A run config's value of a sweepable parameter (``data.<option>``, ``model_options.<key>`` or a field)."""
    for prefix in ("data.", "model_options."):
        if param.startswith(prefix):
            return (cfg.get(prefix[:-1]) or {}).get(param[len(prefix):])
    return cfg.get(param)


def sweep_growth(old: SweepSpec, old_text: str, new: SweepSpec, new_text: str) -> SweepGrowth:
    """Whether ``new`` only grows the grid of ``old`` (same name), so that it can be run in place.

    It does when: both are ``method: grid``; every key but ``parameters`` is as stored (task, train,
    resources, phases, ... compared as parsed YAML, so comments and spacing don't matter); every stored
    parameter is still swept with all its stored values (a stored ``value: x`` may become ``values: [x, ...]``);
    a parameter the stored file does not sweep lists the stored file's setting of it among its values.
    That last rule is what keeps every stored run a run of the new file: run ids are hashes of run
    configs, and the check that settles it is exactly that, every stored run id among the new file's.
    """
    import yaml

    old_raw, new_raw = yaml.safe_load(old_text), yaml.safe_load(new_text)
    diffs = key_differences(old_raw, new_raw)
    if not (isinstance(old_raw, dict) and isinstance(new_raw, dict)):
        return SweepGrowth(diffs, ["(whole file): not a mapping"])
    refused: list[str] = []
    if old.method != "grid" or new.method != "grid":
        refused.append(f"method: only a grid sweep grows in place (stored: {old.method}, this file: {new.method}); "
                       "a random or optuna sweep's points are drawn, not listed")
    refused += key_differences({k: v for k, v in old_raw.items() if k != "parameters"},
                               {k: v for k, v in new_raw.items() if k != "parameters"})
    for pname, p in old.parameters.items():
        if pname not in new.parameters:
            refused.append(f"parameters.{pname}: no longer swept (a grown sweep keeps every stored parameter)")
            continue
        kept = new.parameters[pname].listed() if new.parameters[pname].is_list() else []
        lost = [v for v in (p.listed() if p.is_list() else []) if not any(_same_value(v, w) for w in kept)]
        if lost or not (p.is_list() and new.parameters[pname].is_list()):
            refused.append(f"parameters.{pname}: stored value(s) {_show(lost)} left out (a grown sweep keeps every "
                           "stored value)" if lost else f"parameters.{pname}: a distribution, not a list of values")
    if refused:
        return SweepGrowth(diffs, refused)
    old_runs, new_runs = old.expand(), new.expand()
    new_ids = {r.run_id for r in new_runs}
    lost_runs = [r for r in old_runs if r.run_id not in new_ids]
    if lost_runs:
        base = lost_runs[0].config
        for pname, p in new.parameters.items():
            stored = _setting(base, pname)
            if pname not in old.parameters and not any(_same_value(stored, v) for v in p.listed()):
                refused.append(f"parameters.{pname}: a new parameter whose values {_show(p.listed())} leave out the "
                               f"stored file's setting {_show(stored)}, so the stored runs would not be runs of this "
                               f"file (run ids are hashes of run configs); add {_show(stored)} to its values")
        if not refused:
            refused.append(f"parameters: {len(lost_runs)} of the {len(old_runs)} stored runs would not be runs of this "
                           "file (run ids are hashes of run configs)")
    return SweepGrowth(diffs, refused, len(old_runs), len(new_runs))


def _stored_growth(spec: SweepSpec, text: str, store: Store) -> SweepGrowth:
    import yaml

    from raydyn.track import parse_stored

    stored_text = store.sweep_text(spec.name)
    if stored_text is None:
        return SweepGrowth([], [f"the store has no sweep.yaml for {spec.name!r}"])
    try:
        stored = parse_stored(store, spec.name)
    except RaydynError as e:  # e.g. written by another raydyn version
        return SweepGrowth(key_differences(yaml.safe_load(stored_text), yaml.safe_load(text)),
                           [f"the stored sweep file does not parse: {e}"])
    return sweep_growth(stored, stored_text, spec, text)


GROWTH_RULE = ("a changed file runs in place, training only the new runs, when it grows the stored grid: method "
               "grid, every stored parameter value kept, values, seeds or parameters added (a new parameter's values "
               "including the stored setting), nothing else changed")


def check_sweep_unchanged(spec: SweepSpec, text: str, store: Store, *, allow_growth: bool = False) -> SweepGrowth | None:
    """Refuse a changed sweep file under an existing name (reads only), the message listing the keys that differ.

    With ``allow_growth`` a file that only grows the stored grid (:func:`sweep_growth`) passes: returns how
    it differs. Returns None for a new sweep or an unchanged file (comments and spacing are no change).
    """
    h = sweep_hash(text)
    meta = store.sweep_meta(spec.name)
    if meta is not None and meta.get("kind") == "tracked":
        raise RaydynError(
            f"sweep {spec.name!r} in store {store.uri} holds runs logged with raydyn.track (trained elsewhere); "
            f"`sweep run` does not write into it: give the sweep file another `name:` (e.g. {spec.name}-grid)"
        )
    if meta is None or meta.get("hash") == h:
        return None
    growth = _stored_growth(spec, text, store)
    if allow_growth and not growth.refused:
        return growth
    msg = (f"sweep {spec.name!r} already exists in store {store.uri} with a different sweep file "
           f"(stored hash {meta.get('hash')}, this file {h}): to run the changed file, give it a new `name:` "
           f"(e.g. {spec.name}-v2), or delete the stored sweep first (`raydyn sweep delete {spec.name}`). "
           "Results must say exactly what produced them.")
    if growth.differences:
        msg += "\n  keys that differ (stored -> this file):\n    " + "\n    ".join(growth.differences)
    reasons = [r for r in growth.refused if r not in growth.differences]
    if growth.refused:
        msg += f"\n  {GROWTH_RULE[0].upper()}{GROWTH_RULE[1:]}; this file does not" + (
            ":\n    " + "\n    ".join(reasons) if reasons else " (see the keys above)")
    else:  # it grows the grid, but this command does not train a grown grid (refine)
        msg += (f"\n  This file grows the stored grid ({growth.new_runs - growth.old_runs} new runs): run it with "
                "`raydyn sweep run` first, which trains the new runs and stores it.")
    raise RaydynError(msg)


def base_dir_of(spec: SweepSpec, store: Store) -> str:
    """What the sweep's relative data paths are relative to: the directory it was first launched from
    (recorded with the sweep), else the current directory."""
    meta = store.sweep_meta(spec.name) or {}
    return meta.get("base_dir") or os.getcwd()


def register_sweep(spec: SweepSpec, text: str, store: Store, *, allow_growth: bool = False) -> SweepGrowth | None:
    """Store the sweep file with its hash; refuse a changed file under an existing name.

    With ``allow_growth`` a file that grows the stored grid replaces the stored one; the record keeps the
    creation time and lists each earlier file under ``history`` (its text, hash, sha256, run count, library
    versions and when it was replaced). Returns the growth, or None.
    """
    from raydyn.store.schema import library_versions as versions

    growth = check_sweep_unchanged(spec, text, store, allow_growth=allow_growth)
    meta = store.sweep_meta(spec.name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if meta is None:
        store.put_sweep(spec.name, text, {"hash": sweep_hash(text), "created": now,
                                          "method": spec.method, "versions": versions(), "base_dir": os.getcwd()})
    elif growth is not None:
        earlier = {"hash": meta.get("hash"), "sha256": meta.get("sha256"), "text": store.sweep_text(spec.name),
                   "runs": growth.old_runs, "versions": meta.get("versions"), "replaced": now}
        kept = {k: v for k, v in meta.items() if k not in ("sweep", "sha256", "history")}
        store.put_sweep(spec.name, text, {**kept, "hash": sweep_hash(text), "versions": versions(), "extended": now,
                                          "history": [*meta.get("history", []), earlier]}, overwrite=True)
    return growth


#: Where :func:`preflight` builds models and data: ``"auto"``: in a short-lived child process unless this process
#: has imported torch already (a sweep of built-in models then never loads torch into the driver: ~180 MiB of
#: its peak memory), ``"child"`` or ``"here"`` (this process).
PREFLIGHT_IN = "auto"


def preflight(spec: SweepSpec, runs: list[RunConfig], store: Store) -> None:
    """Build every data set the runs use and one model per architecture and run one forward pass and loss
    (:func:`raydyn.preflight.check`), so that a deterministic set-up error (a missing file, a plug-in that does
    not import or returns no module, a model that does not fit the data) is one message before anything
    launches, not a retried trial. Runs in a child process with the driver's ``sys.path``, working directory
    and environment (:data:`PREFLIGHT_IN`): the same errors and warnings as in this process."""
    from raydyn import preflight as _pf

    pairs, base_dir = _pf.distinct(runs), base_dir_of(spec, store)
    here = PREFLIGHT_IN == "here" or (PREFLIGHT_IN != "child" and "torch" in sys.modules)
    (_pf.check if here else _pf.run_in_child)(spec.name, pairs, base_dir)


def plugin_paths(spec: SweepSpec) -> list[str]:
    """Folders the sweep's plug-in model/data-set modules were imported from on the driver."""
    from raydyn.tasks.plugins import search_paths

    names = [spec.task.model, spec.task.dataset]
    for pname in ("model", "dataset"):
        if pname in spec.parameters and spec.parameters[pname].is_list():
            names += [v for v in spec.parameters[pname].listed() if isinstance(v, str)]
    return search_paths(*names)


def gpu_warning(spec: SweepSpec) -> str | None:
    """A warning when trials reserve GPUs they will not use (``resources.gpu > 0`` with ``device: cpu``)."""
    if spec.resources.gpu > 0 and spec.train.device == "cpu":
        return (f"resources.gpu: {spec.resources.gpu:g} GPU per trial is reserved, but train.device is 'cpu': "
                "trials will not use it (set device: auto or cuda, or gpu: 0)")
    return None


def plan(spec: SweepSpec, store: Store) -> tuple[list[RunConfig], list[RunConfig]]:
    """All runs of the sweep, and those not yet in the store."""
    runs = spec.expand()
    done = store.completed_run_ids(spec.name)
    return runs, [r for r in runs if r.run_id not in done]


def run_sweep(
    spec: SweepSpec,
    text: str,
    store: Store,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    max_failures: int = 2,
) -> SweepOutcome:
    """Train every run of ``spec`` not already in ``store``; returns counts.

    Every check that can fail on user input runs before anything is trained or written:
    the search space, the store (writable), the sweep file (unchanged under its name),
    the cluster (reachable, enough CPUs/GPUs). ``max_failures``: how often Tune retries
    a failed trial (from its last checkpoint) before giving up on it.
    """
    t0 = time.time()
    if spec.method != "optuna":
        spec.expand()  # every point valid, before anything is written
    store.ensure_writable()
    growth = check_sweep_unchanged(spec, text, store, allow_growth=True)  # a grown grid trains its new runs
    if (msg := gpu_warning(spec)) is not None:
        import warnings

        from raydyn.errors import RaydynWarning

        warnings.warn(msg, RaydynWarning, stacklevel=2)
    progress = progress or (lambda info: None)

    if spec.method == "optuna":
        return _run_optuna(spec, text, store, address=address, num_cpus=num_cpus, progress=progress,
                           max_failures=max_failures, t0=t0)

    runs, todo = plan(spec, store)
    out = train_runs(spec, store, todo, origin=spec.method, text=text, address=address, num_cpus=num_cpus,
                     progress=progress, max_failures=max_failures)
    out.total, out.skipped, out.elapsed_s = len(runs), len(runs) - len(todo), time.time() - t0
    out.grown = growth.differences if growth is not None else []
    return out


def train_runs(
    spec: SweepSpec,
    store: Store,
    runs: list[RunConfig],
    *,
    origin: str = "grid",
    text: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    max_failures: int = 1,
) -> SweepOutcome:
    """Train an explicit list of runs of ``spec`` (built with ``spec.run_config(point)``) as runs of the sweep.

    The runs are grouped into populations and trained as Tune trials exactly like ``sweep run``;
    each gets the runs column ``origin`` (``grid``, ``random`` or ``refine``). With ``text`` the
    sweep file is registered once the cluster checks pass (``sweep run``); without it the sweep
    must already be registered (``sweep refine``). Runs already in the store are not trained again.
    """
    t0 = time.time()
    progress = progress or (lambda info: None)
    done = store.completed_run_ids(spec.name)
    todo = list({r.run_id: r for r in runs if r.run_id not in done}.values())
    if not todo:
        if text is not None:
            register_sweep(spec, text, store, allow_growth=True)
        progress({"done": 0, "total": 0, "diverged": 0, "failed": 0, "retried": 0, "elapsed": 0.0})
        return SweepOutcome(spec.name, len(runs), len(runs), 0, 0, elapsed_s=time.time() - t0)
    preflight(spec, todo, store)
    ensure_ray(address, num_cpus)
    check_resources(spec)
    if text is not None:
        register_sweep(spec, text, store, allow_growth=True)
    pops = populations(todo, spec.resources.population_size)
    # Tune sees population ids only; the populations reach the trials once via the object store
    param_space = {"population": tune.grid_search([p.pop_id for p in pops]), "origin": origin}
    cb = _Progress(len(todo), progress)
    grid = _fit(spec, store, param_space, cb, max_failures, tune.TuneConfig(
        max_concurrent_trials=spec.resources.max_concurrent), populations_by_id={p.pop_id: p.to_dict() for p in pops})
    failed = [r.config["population"] for r in grid if r.error is not None]
    return SweepOutcome(spec.name, len(runs), len(runs) - len(todo), cb.done, cb.diverged, failed, time.time() - t0,
                        dict(cb.phase_s), failures=dict(cb.failures), stopped=cb.stopped)


def _fit(spec, store, param_space, cb, max_failures, tune_config, spec_text=None, populations_by_id=None,
         rung_board=None):
    trainable = tune.with_resources(
        tune.with_parameters(population_trial, store_uri=store.uri, sweep=spec.name, spec_text=spec_text,
                             rung_board=rung_board,
                             populations_by_id=populations_by_id, checkpoint_every=spec.train.checkpoint_every,
                             checkpoint_minutes=spec.train.checkpoint_minutes,
                             device=spec.train.device, base_dir=base_dir_of(spec, store),
                             plugin_paths=plugin_paths(spec)),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    storage_path, storage_fs = _tune_storage(store)
    run_config = tune.RunConfig(
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        verbose=0,
        # Tune's own loggers, as it would add them (result.json, progress.csv) but for the TensorBoardX one, which
        # imports torch into the driver (~180 MiB) when tensorboardX is installed and writes files nothing reads
        callbacks=[cb, tune.logger.CSVLoggerCallback(), tune.logger.JsonLoggerCallback()],
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # a retry needs the latest only
    )
    tune_config.trial_name_creator = _trial_name
    tune_config.trial_dirname_creator = _trial_name
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    with _environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # read when the experiment starts, on the driver
        grid = tuner.fit()
    for r in grid:  # a population in the store needs no checkpoint: don't keep a second copy of its records
        if r.error is None and r.checkpoint is not None:
            try:
                r.checkpoint.filesystem.delete_dir(r.checkpoint.path)
            except OSError:
                pass
    return grid


def _trial_name(trial) -> str:
    pop = trial.config.get("population")
    return str(pop) if pop else f"optuna-{trial.trial_id}"


def _trial_name_of(result) -> str:
    """The trial name of a Tune ``Result`` (its folder is named by :func:`_trial_name`)."""
    path = getattr(result, "path", None)
    return os.path.basename(str(path).rstrip("/")) if path else str(result.config)


def _run_optuna(spec, text, store, *, address, num_cpus, progress, max_failures, t0) -> SweepOutcome:
    from ray.tune.search.optuna import OptunaSearch

    seeds = spec.parameters["seed"].listed() if "seed" in spec.parameters else [spec.train.seed]
    done_pops = {p for p in store.table("runs", sweep=spec.name, columns=["population"]).column("population").to_pylist()} \
        if spec.name in store.sweeps() else set()
    remaining = (spec.num_samples or 0) - len(done_pops)
    if remaining <= 0:
        return SweepOutcome(spec.name, len(done_pops) * len(seeds), len(done_pops) * len(seeds), 0, 0,
                            elapsed_s=time.time() - t0)
    try:
        file_run = spec.run_config({})
    except Exception:  # noqa: BLE001 -- the file's own settings need not be a valid point by themselves
        file_run = None
    if file_run is not None:
        preflight(spec, [file_run], store)  # the file's own settings: data set and model build
    ensure_ray(address, num_cpus)
    check_resources(spec)
    register_sweep(spec, text, store)
    space: dict[str, Any] = {}
    for name, p in spec.parameters.items():
        if name == "seed":
            continue
        if p.is_list():
            space[name] = tune.choice(p.listed())
        elif p.distribution == "uniform":
            space[name] = tune.uniform(p.min, p.max)
        elif p.distribution == "log_uniform":
            space[name] = tune.loguniform(p.min, p.max)
        else:
            space[name] = tune.randint(int(math.ceil(p.min)), int(math.floor(p.max)) + 1)
    board = None
    if spec.train.early_stop is not None:  # prune trials at the rungs: ASHA's rule over all trials so far
        es = spec.train.early_stop
        board = ray.remote(RungBoard).options(num_cpus=0).remote(es.eta, es.mode)
    searcher = (_pruning_searcher() if board is not None else OptunaSearch)(
        metric="objective", mode="min" if spec.goal == "minimize" else "max", seed=int(spec.train.seed))
    cb = _Progress(remaining * len(seeds), progress)
    grid = _fit(spec, store, space, cb, max_failures, tune.TuneConfig(
        search_alg=searcher, num_samples=remaining, max_concurrent_trials=spec.resources.max_concurrent),
        spec_text=text, rung_board=board)
    failed = [_trial_name_of(r) for r in grid if r.error is not None]
    return SweepOutcome(spec.name, (len(done_pops) + remaining) * len(seeds), len(done_pops) * len(seeds),
                        cb.done, cb.diverged, failed, time.time() - t0, failures=dict(cb.failures), stopped=cb.stopped)


class RungBoard:
    """Pruning of an Optuna sweep's trials (``train.early_stop`` with ``method: optuna``): Ray Tune's ASHA
    rule, decided by the trial itself so that a pruned trial still writes its runs (Tune's schedulers stop a
    function trainable from outside, before it could). A trial reports its configuration's mean rung metric
    at each rung; it is pruned when that is worse than the best ``1/eta`` quantile of the values earlier
    trials reported at that rung (the first trial at a rung always continues). Runs as a Ray actor."""

    def __init__(self, eta: int, mode: str):
        self.eta, self.sign = int(eta), 1.0 if mode == "min" else -1.0
        self.seen: dict[int, list[float]] = {}

    def report(self, rung: int, value: float) -> bool:
        """True: prune the trial at ``rung``. Non-finite values are the worst."""
        import numpy as np

        v = self.sign * value if math.isfinite(value) else 1e300
        recorded = self.seen.setdefault(int(rung), [])
        prune = bool(recorded) and v > float(np.percentile(recorded, 100.0 / self.eta))
        recorded.append(v)
        return prune


def _pruning_searcher():
    """OptunaSearch that tells Optuna a trial whose final result says ``pruned`` was pruned (at its last
    intermediate value), not completed with the metrics it stopped at."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class PruningOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            done, trials = getattr(self, "_completed_trials", None), getattr(self, "_ot_trials", {})
            if result and result.get("pruned") and done is not None and trial_id in trials and trial_id not in done:
                try:
                    self._ot_study.tell(trials[trial_id], state=TrialState.PRUNED)
                except Exception as exc:  # noqa: BLE001 -- as OptunaSearch does: a refused tell is logged only
                    logging.getLogger(__name__).warning(exc)
                done.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    return PruningOptunaSearch


def sweep_status(spec: SweepSpec, store: Store) -> dict[str, Any]:
    """Counts of runs in the store by status, and how many the sweep file still lacks."""
    if getattr(spec, "method", None) == "tracked":
        from raydyn.track import tracked_status

        return tracked_status(store, spec.name)
    table = store.table("runs", sweep=spec.name, columns=["run_id", "status"]) if spec.name in store.sweeps() else None
    by_status: dict[str, int] = {}
    if table is not None:
        for s in table.column("status").to_pylist():
            by_status[s] = by_status.get(s, 0) + 1
    if spec.method == "optuna":
        total = (spec.num_samples or 0) * len(spec.parameters["seed"].listed() if "seed" in spec.parameters else [0])
    else:
        total = len(spec.expand())
    in_store = sum(by_status.values())
    missing = max(0, total - in_store)
    if spec.method != "optuna" and table is not None:  # refined runs are extra: count the file's runs
        missing = len({r.run_id for r in spec.expand()} - set(table.column("run_id").to_pylist()))
    return {"sweep": spec.name, "total": total, "in_store": in_store, "missing": missing,
            "by_status": by_status, "meta": store.sweep_meta(spec.name)}


def list_sweeps(store: Store) -> list[dict[str, Any]]:
    """Every sweep in the store, by name: its kind (``sweep file``, ``tracked``, or ``no record`` for parts
    without a sweeps/<name>/ record), method, runs by status (one read of the runs table), when it was
    created, and how many sweep files it has had (more than one once grown in place)."""
    from raydyn.errors import StoreError

    runs = store.table("runs", columns=["sweep", "status"])
    counts: dict[str, dict[str, int]] = {}
    for s, st in zip(runs.column("sweep").to_pylist(), runs.column("status").to_pylist()):
        by = counts.setdefault(s, {})
        by[str(st)] = by.get(str(st), 0) + 1
    out = []
    for name in store.sweeps():
        try:
            meta = store.sweep_meta(name)
        except StoreError:  # an unreadable record: still listed, so that it can be deleted
            meta = None
        kind = "no record" if meta is None else ("tracked" if meta.get("kind") == "tracked" else "sweep file")
        by_status = dict(sorted(counts.get(name, {}).items()))
        out.append({"sweep": name, "kind": kind, "method": (meta or {}).get("method"), "runs": sum(by_status.values()),
                    "by_status": by_status, "created": (meta or {}).get("created") or (meta or {}).get("created_utc"),
                    "sweep_files": 1 + len((meta or {}).get("history", [])) if kind == "sweep file" else None})
    return out


def to_json(o: Any) -> str:
    return json.dumps(o, indent=2, sort_keys=True, default=str)
