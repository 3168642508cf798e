"""Import runs trained elsewhere: a folder of PyTorch checkpoints, TensorBoard scalar logs.

Both write through :mod:`raydyn.track` (same tables, same parts, a tracked sweep), so everything it
guarantees holds here too: whole parts only, the runs row last, no duplicate runs.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A
file that would need to unpickle arbitrary Python objects (which can run code) is refused, never
loaded.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from raydyn.errors import RaydynError

#: a step in a file name: ``step_000100.pt``, ``step-100.pth``, ``epoch=3-step=1200.ckpt``, ``100.pt`` (other
#: numbers, as in ``ckpt-3.pt``, may count epochs or saves: such files give their step in a ``step`` entry)
_STEP_IN_NAME = re.compile(r"(?:(?:^|[_=-])step[_=-]?|^)(\d+)(?=\.(?:pt|pth|ckpt|bin)$)")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_STATE_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "net", "weights")


def load_checkpoint(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a refusal or a broken file is a RaydynError
    naming the file. ``mmap``: map the tensors instead of reading them (to look at a step entry)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        raise RaydynError(f"checkpoint {path}: refused: it holds Python objects beyond tensors and plain containers, "
                          "and unpickling them could run arbitrary code (raydyn loads checkpoints with "
                          f"torch.load(weights_only=True)). Save model.state_dict() instead. ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise RaydynError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                          "is it a complete torch.save file?") from None


def state_dict_of(obj: Any, path: Path) -> tuple[dict[str, Any], int | None]:
    """(state dict, step or None) of a loaded checkpoint: a bare state dict, or a dict holding one
    under ``model``/``state_dict``/... with ``step``/``global_step`` beside it."""
    import torch

    if not isinstance(obj, Mapping):
        raise RaydynError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state dict or a dict with one")
    step = None
    for k in ("step", "global_step", "iteration"):
        v = obj.get(k)
        if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (torch.is_tensor(v) and v.numel() == 1):
            step = int(v)
            break
    for k in _STATE_KEYS:
        if isinstance(obj.get(k), Mapping) and any(torch.is_tensor(v) for v in obj[k].values()):
            sd = obj[k]
            break
    else:
        sd = obj
    tensors = {n: v for n, v in sd.items() if torch.is_tensor(v)}
    if not any(v.is_floating_point() for v in tensors.values()):
        raise RaydynError(f"checkpoint {path}: no floating-point tensors found (keys: {', '.join(list(obj)[:8])}); "
                          f"raydyn looks for a state dict, bare or under one of {', '.join(_STATE_KEYS)}")
    return tensors, step


def checkpoint_files(directory: Path) -> list[tuple[int | None, Path]]:
    """The folder's checkpoint files with the step their name gives (None when it gives none)."""
    if not directory.is_dir():
        raise RaydynError(f"{directory}: no such checkpoint folder")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise RaydynError(f"{directory}: no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)})")
    out = []
    for p in files:
        m = _STEP_IN_NAME.search(p.name)
        out.append((int(m.group(1)) if m else None, p))
    return out


def read_metrics_log(path: Path, step_key: str = "step") -> dict[int, dict[str, float]]:
    """Per-step metrics from a CSV file (header row; one column is ``step_key``) or JSON lines (one
    object per line). Non-numeric and empty cells are left out; rows of the same step are merged."""
    if not path.is_file():
        raise RaydynError(f"{path}: no such metrics log")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaydynError(f"{path}:{i}: not a JSON object ({e.msg})") from None
            rows.append(_metrics_row(rec, step_key, f"{path}:{i}"))
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or step_key not in reader.fieldnames:
                raise RaydynError(f"{path}: the header has no {step_key!r} column (columns: {reader.fieldnames})")
            for i, rec in enumerate(reader, 2):
                rows.append(_metrics_row(rec, step_key, f"{path}:{i}"))
    out: dict[int, dict[str, float]] = {}
    for step, vals in rows:
        out.setdefault(step, {}).update(vals)
    return out


def _metrics_row(rec: Any, step_key: str, where: str) -> tuple[int, dict[str, float]]:
    if not isinstance(rec, Mapping):
        raise RaydynError(f"{where}: not a JSON object")
    try:
        step = int(float(rec[step_key]))
    except (KeyError, TypeError, ValueError):
        raise RaydynError(f"{where}: no integer {step_key!r} value ({rec.get(step_key)!r})") from None
    vals = {}
    for k, v in rec.items():
        if k == step_key or v is None or v == "" or isinstance(v, bool):
            continue
        try:
            vals[k] = float(v)
        except (TypeError, ValueError):
            continue  # a text column (a timestamp, a tag): not a metric
    return step, vals


def _model_of(config: Mapping[str, Any], state: dict[str, Any], path: Path):
    """The config's ``model: "module:callable"`` factory built and loaded with ``state``, or None."""
    from raydyn.tasks.plugins import is_import_path, resolve

    name = config.get("model")
    if not (isinstance(name, str) and is_import_path(name)):
        return None
    factory = resolve(name, "config model")
    opts = dict(config.get("model_options") or {})
    try:
        module = factory(**opts)
    except TypeError as e:
        raise RaydynError(f"config model {name!r}: calling it with model_options {opts} failed ({e}); give the "
                          "factory's arguments as config model_options") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RaydynError(f"checkpoint {path}: does not fit the model {name!r} (missing {list(missing)[:5]}, "
                          f"unexpected {list(unexpected)[:5]})")
    return module


def import_checkpoints(store: Any, directory: str | Path, *, sweep: str, config: Mapping[str, Any] | None = None,
                       metrics: str | Path | None = None, run_id: str | None = None,
                       weights: Mapping[str, Any] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """Import one run from a folder of checkpoints (one file per step) and an optional metrics log.

    The step of a file is its ``step``/``global_step`` entry, else the number in its name
    (``step_000100.pt``). Snapshots keep the checkpoint's precision (float64 stays float64) unless
    ``weights={"dtype": ...}``. With ``config["model"] = "module:callable"`` each state dict is
    loaded into that model first, so parameters and buffers are told apart as in raydyn's own runs;
    otherwise every floating tensor of the state dict is a stored parameter. Returns (run id,
    snapshots imported).
    """
    from raydyn.track import track

    directory = Path(directory)
    files = checkpoint_files(directory)
    logged = read_metrics_log(Path(metrics)) if metrics else {}
    config = dict(config or {})
    loaded: list[tuple[int, Path]] = []
    # every file opened (memory-mapped) before anything is written: a refused or broken file, or one
    # whose step cannot be told, stops the import with nothing in the store; records go in step order
    for step, p in files:
        _, inner = state_dict_of(load_checkpoint(p, mmap=True), p)
        if step is not None and inner is not None and inner != step:
            raise RaydynError(f"checkpoint {p}: its name says step {step} but it holds step {inner}")
        step = inner if step is None else step
        if step is None:
            raise RaydynError(f"checkpoint {p}: no step in its name (step_000100.pt) nor a 'step' entry")
        loaded.append((step, p))
    steps = [s for s, _ in loaded]
    if len(set(steps)) != len(steps):
        dup = sorted({s for s in steps if steps.count(s) > 1})[:3]
        raise RaydynError(f"{directory}: several checkpoints for step(s) {dup}")
    by_step = dict(loaded)
    all_steps = sorted(set(by_step) | set(logged))
    wcfg = dict(weights or {})
    n = 0
    with track(store, sweep=sweep, config=config, run_id=run_id, weights=wcfg or None, rank=0) as run:
        for i, step in enumerate(all_steps):
            model = None
            if step in by_step:
                p = by_step[step]
                state, _ = state_dict_of(load_checkpoint(p), p)
                model = _model_of(config, state, p) or state
                n += 1
            run.log(step, logged.get(step, {}), model=model)
            if progress:
                progress(i + 1, len(all_steps))
    return run.run_id, n


# ------------------------------------------------------------------------------ TensorBoard
def _event_reader():
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise RaydynError("`raydyn import tensorboard` reads event files with TensorBoard's reader, which is not "
                          "installed: pip install tensorboard (or pip install 'raydyn[tensorboard]')") from None
    return event_accumulator


def tensorboard_runs(logdir: Path) -> list[Path]:
    """Folders under ``logdir`` (itself included) that hold event files: one run each."""
    if not logdir.is_dir():
        raise RaydynError(f"{logdir}: no such log folder")
    dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    if not dirs:
        raise RaydynError(f"{logdir}: no TensorBoard event files (events.out.tfevents.*) in it or below it")
    return dirs


def metric_column(tag: str) -> str:
    """A TensorBoard tag as a metrics column: ``Loss/train`` -> ``loss_train``."""
    return re.sub(r"[^0-9a-zA-Z_]+", "_", tag).strip("_").lower() or "value"


def import_tensorboard(store: Any, logdir: str | Path, *, sweep: str, config: Mapping[str, Any] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Import every run folder of ``logdir`` (scalars only) as one tracked run each: its metrics rows
    are the scalar tags (as ``metric_column`` names) at their steps; its config is ``config`` plus
    ``run`` (the folder relative to ``logdir``). Returns the run ids."""
    from raydyn.track import track

    acc_mod = _event_reader()
    logdir = Path(logdir)
    ids = []
    dirs = tensorboard_runs(logdir)
    for k, d in enumerate(dirs):
        acc = acc_mod.EventAccumulator(str(d), size_guidance={acc_mod.SCALARS: 0})
        try:
            acc.Reload()
        except Exception as e:  # a truncated or foreign file: name it
            raise RaydynError(f"{d}: cannot read its event files ({type(e).__name__}: {str(e)[:200]})") from None
        tags = acc.Tags().get("scalars", [])
        by_step: dict[int, dict[str, float]] = {}
        names: dict[str, str] = {}
        for tag in tags:
            col = metric_column(tag)
            if col in names.values():
                raise RaydynError(f"{d}: tags {tag!r} and {[t for t, c in names.items() if c == col][0]!r} both "
                                  f"become the column {col!r}")
            names[tag] = col
            for ev in acc.Scalars(tag):
                by_step.setdefault(int(ev.step), {})[col] = float(ev.value)
        rel = d.relative_to(logdir).as_posix()
        cfg = {**dict(config or {}), "run": rel if rel != "." else logdir.name}
        rid = "tb-" + re.sub(r"[^A-Za-z0-9._-]+", "-", cfg["run"]).strip("-.")[:180]
        with track(store, sweep=sweep, config=cfg, run_id=rid, rank=0) as run:
            for step in sorted(by_step):
                run.log(step, by_step[step])
        ids.append(run.run_id)
        if progress:
            progress(k + 1, len(dirs))
    return ids


def read_config(path: str | Path | None) -> dict[str, Any]:
    """A run config from a YAML or JSON file (a mapping), or {}."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RaydynError(f"{p}: no such config file")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RaydynError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise RaydynError(f"{p}: a config file holds a mapping of settings (key: value), not a {type(cfg).__name__}")
    return cfg


__all__ = ["import_checkpoints", "import_tensorboard", "load_checkpoint", "read_metrics_log", "read_config",
           "checkpoint_files", "state_dict_of", "metric_column", "tensorboard_runs"]
