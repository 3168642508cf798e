"""Resolve user code named by an import path, ``"package.module:callable"``.

Used for plug-in models (``task.model: "my_models:resnet"``) and data sets
(``task.dataset: "my_data:load"``). The path is resolved on the driver when the sweep
file is read and again on every Ray worker that builds the run, so a worker needs the
module on its ``sys.path`` too (an installed package, ``PYTHONPATH``, or Ray's
``runtime_env``). A module in the current working directory is importable too (as with ``python -m``).
Errors name the path and say what went wrong.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from raydyn.errors import RaydynError

#: ``module.path:attribute.path`` -- both halves dotted Python identifiers.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class PluginError(RaydynError, ValueError):
    """An import path that does not resolve to a callable (a ValueError too, so sweep-file validation
    reports it at its key path)."""


def add_search_path(*dirs: str | None) -> None:
    """Make modules in ``dirs`` importable (appended to ``sys.path``, after installed packages, if not
    there yet). Ray workers call it with the driver's directories, so a plug-in the driver imported
    from its working directory or its PYTHONPATH imports on the workers of the same machine too."""
    for d in dirs:
        if d and os.path.isdir(d) and d not in sys.path and os.path.abspath(d) not in sys.path:
            sys.path.append(os.path.abspath(d))


def search_paths(*import_paths: str) -> list[str]:
    """The ``sys.path`` entries the (already imported) modules of ``import_paths`` were found in."""
    out = []
    for path in import_paths:
        if not isinstance(path, str) or not is_import_path(path):
            continue
        top = sys.modules.get(path.split(":", 1)[0].split(".")[0])
        f = getattr(top, "__file__", None)
        if not f:
            continue
        d = os.path.dirname(os.path.abspath(f))
        if os.path.basename(f) == "__init__.py":  # a package: its parent folder is the path entry
            d = os.path.dirname(d)
        if d not in out:
            out.append(d)
    return out


def is_import_path(name: str) -> bool:
    """True when ``name`` looks like ``module:callable`` (and so is not a registered name)."""
    return ":" in name


def resolve(path: str, what: str = "plug-in") -> Callable[..., Any]:
    """The callable named by ``path`` (``"module.sub:attr.attr"``); :class:`PluginError` naming the
    path when it is malformed, the module does not import, the attribute is missing or not callable.

    ``what`` says where the path came from in messages (e.g. ``"task.model"``).
    """
    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise PluginError(f"{what}: {path!r} is not an import path; write 'package.module:function' "
                          "(e.g. 'my_models:resnet')")
    module_name, attr = path.split(":", 1)
    try:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # like `python -m` and uvicorn: a module in the working directory is importable
            if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise
            add_search_path(os.getcwd())
            obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        hint = ("; is its folder on PYTHONPATH (on the driver and on every Ray worker) or the package installed?"
                if missing == module_name.split(".")[0] or missing == module_name else "")
        raise PluginError(f"{what}: {path!r}: module {missing!r} not found{hint}") from None
    except Exception as e:  # the user's module raised while importing: say so, with its own message
        raise PluginError(f"{what}: {path!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise PluginError(f"{what}: {path!r}: {module_name!r} has no attribute {attr!r}"
                              + (f"; it defines: {', '.join(names)}" if names else "")) from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{what}: {path!r} is a {type(obj).__name__}, not a callable "
                          "(a function or class that builds the thing)")
    return obj


def module_file(path: str) -> str | None:
    """The file the module of ``path`` was loaded from, if it is loaded (for messages)."""
    mod = sys.modules.get(path.split(":", 1)[0])
    return getattr(mod, "__file__", None)
