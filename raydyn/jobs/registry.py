"""The analysis registry: the one place an analysis is made known to raydyn.

An analysis is a :class:`~raydyn.jobs.base.Job` subclass (``name``, ``Options``, ``plan``/``compute``/
``finish``) plus what the CLI and the report need, registered once as an :class:`Analysis`::

    from raydyn.jobs import Analysis, Job, Options, option, register

    @dataclass(frozen=True)
    class ToyOptions(Options):
        scale: float = option(1.0, "Multiply every final loss by this.")

    class ToyJob(Job):
        name = "toy"
        Options = ToyOptions
        ...

    register(Analysis(ToyJob, report=toy_section))

From that one call, ``raydyn analyze toy`` exists (its options are the fields of ``ToyOptions``:
types, defaults and help from the dataclass; ``--scale`` from the field name), ``raydyn report``
draws its section when the sweep has one of its tables, and :func:`analyses` lists it. Installed
packages register analyses without any import by the user through the entry-point group
``raydyn.analyses`` (an entry point names an :class:`Analysis`), as models and data sets do
through ``raydyn.models`` / ``raydyn.datasets``.

Options are frozen dataclasses: a field's value is what the job reads (``self.options.delays``),
its :func:`option` metadata says how the command line spells and parses it, and
:meth:`Options.record` is what lands in every table's ``options_json`` column.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from raydyn.errors import RaydynError
from raydyn.jobs.base import Job
from raydyn.jobs.options import Options

#: Entry-point group of installed analyses (each entry point names an :class:`Analysis`).
ENTRY_POINT_GROUP = "raydyn.analyses"
#: raydyn's own analyses, in the order the CLI lists them (module raydyn.jobs.<name> registers each).
BUILTIN = ("hmm", "koopman", "phase", "cmd", "symmetry", "neurons")

@dataclass(frozen=True)
class Analysis:
    """One registered analysis: the job class (whose ``name`` and ``Options`` it takes) and its hooks.

    - ``report``: ``fn(store, sweep) -> [(title, png_bytes), ...]``, the report's section; or an import
      path ``"module:function"`` (resolved when a report is built, so the CLI need not import matplotlib).
    - ``after``: ``fn(store, sweep, options) -> lines`` printed after ``raydyn analyze <name>`` wrote its
      tables (also when some units failed), e.g. the rule that cut conjugacy classes.
    - ``tables``: table-name prefixes whose presence in the store turns the report section on
      (default: ``"<name>_"``).
    - ``summary``: the one line ``raydyn analyze --help`` lists (default: the job's docstring's first
      line); ``description`` the rest of ``raydyn analyze <name> --help``.
    """

    job: type
    report: Callable[[Any, str], list[tuple[str, bytes]]] | str | None = None
    after: Callable[[Any, str, Any], Iterable[str]] | str | None = None
    tables: tuple[str, ...] = ()
    summary: str = ""
    description: str = ""

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def options(self) -> type:
        return self.job.Options

    @property
    def table_prefixes(self) -> tuple[str, ...]:
        return tuple(self.tables) or (f"{self.name}_",)

    def help_lines(self) -> tuple[str, str]:
        import inspect

        # paragraphs of the docstring, each joined into one line (help text wraps to the terminal itself)
        paras = [" ".join(p.split()) for p in inspect.cleandoc(self.job.__doc__ or "").split("\n\n") if p.strip()]
        return (self.summary or (paras[0] if paras else "")), (self.description or "\n\n".join(paras[1:]))

    def report_fn(self) -> Callable[[Any, str], list[tuple[str, bytes]]] | None:
        return _resolve(self.report)

    def after_fn(self) -> Callable[[Any, str, Any], Iterable[str]] | None:
        return _resolve(self.after)


def _resolve(fn):
    if fn is None or callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    return getattr(importlib.import_module(module), attr)


_ANALYSES: dict[str, Analysis] = {}
_loaded = False


def register(analysis: Analysis) -> Analysis:
    """Make ``analysis`` known: ``raydyn analyze <name>``, its report section, :func:`analyses`.

    Registering the same job class again replaces the entry (a re-imported module); another analysis of
    the same name is refused."""
    job = analysis.job
    if not (isinstance(job, type) and issubclass(job, Job)):
        raise RaydynError(f"register: {job!r} is not a raydyn.jobs.Job subclass")
    name = getattr(job, "name", "")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise RaydynError(f"register: {job.__qualname__}.name must be a word (letters, digits, - or _), got {name!r}")
    opts = getattr(job, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, Options) and dataclasses.is_dataclass(opts)):
        raise RaydynError(f"register: {job.__qualname__}.Options must be a dataclass subclassing "
                          "raydyn.jobs.registry.Options")
    old = _ANALYSES.get(name)
    if old is not None and old.job.__qualname__ != job.__qualname__:
        raise RaydynError(f"register: an analysis named {name!r} is already registered "
                          f"({old.job.__module__}.{old.job.__qualname__})")
    _ANALYSES[name] = analysis
    return analysis


def _load() -> None:
    """Import raydyn's own job modules and the installed packages' entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for m in BUILTIN:
        importlib.import_module(f"raydyn.jobs.{m}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _ANALYSES:
            continue
        try:
            obj = ep.load()
            register(obj if isinstance(obj, Analysis) else Analysis(obj))
        except Exception as e:  # one broken package must not take `raydyn analyze` down
            import warnings

            from raydyn.errors import RaydynWarning

            warnings.warn(f"analysis {ep.name!r} registered by an installed package ({ep.value}) could not be "
                          f"loaded: {type(e).__name__}: {e}", RaydynWarning, stacklevel=2)


def analyses() -> dict[str, Analysis]:
    """Every registered analysis by name: raydyn's own first, then installed and user-registered ones."""
    _load()
    return dict(_ANALYSES)


def get(name: str) -> Analysis:
    known = analyses()
    if name not in known:
        raise RaydynError(f"no analysis named {name!r}; known: {', '.join(known)}")
    return known[name]


__all__ = ["Analysis", "register", "analyses", "get", "ENTRY_POINT_GROUP", "BUILTIN"]
