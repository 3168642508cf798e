"""The check ``sweep run`` makes before Ray starts: build every data set the runs use and one model per
architecture, and run one forward pass and loss, so that a deterministic set-up error is one message
(exit 2, nothing written), not a retried trial. Also :func:`root_cause`, which names an error's place.

This module imports no Ray and, at import, no torch: :func:`raydyn.sweep.preflight` runs :func:`check`
in a short-lived child process (:func:`run_in_child`) when the driver has not imported torch, so that the
driver of a sweep of built-in models never loads torch (~180 MiB of its peak memory). The child gets the
driver's ``sys.path``, working directory and environment, so plug-ins resolve as on the driver; it sends
back the error (its own exception, pickled, or its message) and the warnings it raised, which the driver
raises and re-issues as if the check had run in the driver.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Any

_OWN_FRAMES = re.compile(r"[/\\](site-packages|dist-packages|lib[/\\]python3\.\d+)[/\\]|[/\\]raydyn[/\\]"
                         r"(sweep|preflight|fanout|train|tasks|store|jobs|analysis|spec)")


def root_cause(err: BaseException | str) -> str:
    """``Type: message (at file:line, in function)`` of an exception or of a traceback's text (Ray's trial errors
    arrive as text); the place is the innermost frame outside Python's, Ray's, torch's and raydyn's own code
    (the user's plug-in), when there is one."""
    if isinstance(err, BaseException):
        import traceback

        msg = str(err).strip()
        return (f"{type(err).__name__}: {msg}" if msg else type(err).__name__) + _place(
            "".join(traceback.format_exception(err)))
    text = str(err)
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    # the exception line: the last unindented "Name: message" line (Ray prefixes "ray.exceptions.RayTaskError(X): ")
    pattern = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b(\([\w.]+\))?)(: .*)?$")
    last = next((ln for ln in reversed(lines) if pattern.match(ln) and not ln.startswith("ray.exceptions.")),
                lines[-1] if lines else "unknown error")
    return last.strip() + _place(text)


def _place(tb: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    user = [f for f in frames if not _OWN_FRAMES.search(f[0]) and not f[0].startswith("<")]
    if not user:
        return ""
    f, line, fn = user[-1]
    return f" (at {f}:{line}, in {fn})"


# ----------------------------------------------------------------------------- the check
def distinct(runs: list[Any]) -> list[tuple[dict[str, Any], str]]:
    """``(config, population key)`` of the first run of each distinct (data set, architecture) pair, in order:
    all :func:`check` needs (a later run of a pair it has seen neither loads data nor builds a model)."""
    out, seen = [], set()
    for r in runs:
        cfg, arch = r.config, r.population_key()
        key = (_data_key(cfg), arch)
        if key not in seen:
            seen.add(key)
            out.append((cfg, arch))
    return out


def _data_key(cfg: dict[str, Any]) -> str:
    return json.dumps([cfg["dataset"], cfg["data"], cfg["dtype"]], sort_keys=True, default=str)


def check(sweep: str, runs: list[tuple[dict[str, Any], str]], base_dir: str) -> None:
    """Build every data set of ``runs`` (``(config, population key)`` pairs, :func:`distinct`) and one model per
    population key, and run :func:`smoke_step` on each model; a RaydynError saying what failed. Relative data
    paths are resolved against ``base_dir``. Imports torch."""
    import torch

    from raydyn.errors import RaydynError as _Err
    from raydyn.tasks import registry
    from raydyn.tasks.build import init_model, load_data

    seen_data: dict[str, Any] = {}
    seen_arch: set[str] = set()
    for cfg, arch in runs:
        if registry.model(cfg["model"]).trainer != "population":
            continue
        dkey = _data_key(cfg)
        if dkey not in seen_data:
            seen_data[dkey] = load_data(cfg, base_dir)
        if arch in seen_arch:
            continue
        seen_arch.add(arch)
        data = seen_data[dkey]
        try:
            with torch.random.fork_rng():
                model = init_model(cfg, data)
        except _Err:
            raise
        except Exception as e:  # a built-in model that does not fit the data (shapes, vocab, ...)
            raise _Err(f"sweep {sweep!r}: building model {cfg['model']!r} for dataset {cfg['dataset']!r} "
                       f"failed: {root_cause(e)}") from None
        smoke_step(sweep, cfg, model, data)


def smoke_step(sweep: str, cfg: dict[str, Any], model: Any, data: Any) -> None:
    """One training forward pass and loss of ``model`` on a few training samples, and one evaluation forward:
    a model whose output does not fit the labels or the loss (or that raises in ``forward``) fails here, once,
    instead of in every trial and every retry. No parameter changes (no backward, RNG forked)."""
    import torch

    from raydyn.errors import RaydynError as _Err
    from raydyn.train.objectives import loss_fn

    loss_name = cfg.get("loss") or data.default_loss
    n = max(2, min(int(cfg["batch_size"]), int(data.n_train), 8))  # batch norm in train mode needs > 1 sample
    x, y = data.head("train", n)
    try:
        with torch.random.fork_rng(), torch.no_grad():
            model.train()
            loss = loss_fn(loss_name, model(x), y)
            if loss.dim() != 0:
                raise ValueError(f"the loss is not a scalar (shape {tuple(loss.shape)})")
            model.eval()
            model(x)
    except Exception as e:  # noqa: BLE001 -- any failure of the user's model on its data is reported as one message
        raise _Err(f"sweep {sweep!r}: model {cfg['model']!r} fails on a batch of {n} samples of dataset "
                   f"{cfg['dataset']!r} (input {tuple(x.shape)}, labels {tuple(y.shape)}, loss {loss_name}): "
                   f"{root_cause(e)}. Nothing was trained.") from None


# ----------------------------------------------------------------------------- in a child process
# The child: the driver's sys.path first (so raydyn and the plug-ins import from where the driver has them).
_BOOT = ("import pickle, sys; job = pickle.load(sys.stdin.buffer); sys.path[:] = job['sys_path']; "
         "from raydyn.preflight import _child; _child(job)")


def run_in_child(sweep: str, runs: list[tuple[dict[str, Any], str]], base_dir: str) -> None:
    """:func:`check` in a fresh Python process (this process imports no torch): the same exception raised
    here (a RaydynError with the same message), the same warnings issued here; the child's own output is
    printed here once it has finished. Ctrl-C (or SIGTERM) here stops the child too."""
    fd, result = tempfile.mkstemp(prefix="raydyn-preflight-", suffix=".pickle")
    os.close(fd)
    try:
        job = {"sweep": sweep, "runs": runs, "base_dir": base_dir, "sys_path": list(sys.path), "result": result}
        proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=os.getcwd())
        try:
            stdout, stderr = proc.communicate(pickle.dumps(job))
        except BaseException:  # KeyboardInterrupt (Ctrl-C, SIGTERM): the child goes with the driver
            proc.kill()
            proc.wait()
            raise
        for data, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
            if data:  # a plug-in's prints, say
                stream.write(data.decode(errors="replace"))
                stream.flush()
        with open(result, "rb") as f:
            out = pickle.loads(f.read()) if os.path.getsize(result) else None
    finally:
        os.unlink(result)
    if out is None and proc.returncode in (130, -2):  # the child alone got a Ctrl-C
        raise KeyboardInterrupt
    if out is None:
        from raydyn.errors import RaydynError

        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RaydynError(f"sweep {sweep!r}: the check before Ray starts (building each data set and one model per "
                          f"architecture, in a child process) ended with exit status {proc.returncode} and no "
                          "result" + (": " + " | ".join(tail) if tail else "") + ". Nothing was trained.")
    _reissue(out["warnings"])
    if out["error"] is not None:
        raise _error(out["error"]) from None


def _child(job: dict[str, Any]) -> None:
    import warnings

    out: dict[str, Any] = {"error": None, "warnings": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the driver's filters decide what is shown
            try:
                check(job["sweep"], job["runs"], job["base_dir"])
            except Exception as e:  # noqa: BLE001 -- every error goes back to the driver
                out["error"] = _pack(e)
        out["warnings"] = [(str(w.message), [(c.__module__, c.__qualname__) for c in w.category.__mro__],
                            w.filename, w.lineno) for w in caught]
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the driver reports it
        sys.exit(130)
    with open(job["result"], "wb") as f:
        f.write(pickle.dumps(out))


def _pack(e: Exception) -> dict[str, Any]:
    import traceback

    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)  # the child has imported all the driver has (and more), so this is the test
    except Exception:  # noqa: BLE001 -- an exception that does not pickle: its type name and message
        blob = None
    from raydyn.errors import RaydynError

    return {"pickled": blob, "raydyn": isinstance(e, RaydynError), "type": type(e).__name__, "message": str(e),
            "traceback": "".join(traceback.format_exception(e))}


def _error(packed: dict[str, Any]) -> BaseException:
    from raydyn.errors import RaydynError

    err: BaseException | None = None
    if packed["pickled"] is not None:
        try:
            err = pickle.loads(packed["pickled"])
        except Exception:  # noqa: BLE001 -- e.g. the class of a module the driver never imported
            err = None
    if err is None:
        err = RaydynError(packed["message"]) if packed["raydyn"] else RuntimeError(
            f"{packed['type']}: {packed['message']}")
    if not isinstance(err, RaydynError):  # a bug, not a user mistake: its traceback is printed, show the child's
        err.add_note("raised in the preflight child process:\n" + packed["traceback"].rstrip())
    return err


def _reissue(caught: list[tuple[str, list[tuple[str, str]], str, int]]) -> None:
    """The child's warnings, issued here, each once, with their category when this process has its class
    (else the nearest base class it has: the child's classes are not imported here for that)."""
    import builtins
    import warnings

    shown = set()
    for message, mro, filename, lineno in caught:
        if (message, mro[0], filename, lineno) in shown:
            continue
        shown.add((message, mro[0], filename, lineno))
        category: Any = Warning
        for module, qualname in mro:
            mod = builtins if module == "builtins" else sys.modules.get(module)
            obj = getattr(mod, qualname, None) if mod is not None and "." not in qualname else None
            if isinstance(obj, type) and issubclass(obj, Warning):
                category = obj
                break
        warnings.warn_explicit(message, category, filename, lineno)
