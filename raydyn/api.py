"""The Python API for notebooks: load a sweep, run it, get models back.

>>> import raydyn
>>> sweep = raydyn.Sweep.from_yaml("sweeps/quickstart.yaml")        # or Sweep.from_dict({...})
>>> summary = raydyn.run_sweep(sweep, store="raydyn-results")       # embedded local Ray, or address=...
>>> store = raydyn.open_store("raydyn-results")
>>> model = store.model(store.runs(sweep="quickstart").column("run_id")[0].as_py())

Everything goes through the same code as ``raydyn sweep run`` (validation, resume, the store).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raydyn.errors import SpecError


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file: ``spec`` (:class:`raydyn.spec.SweepSpec`) and the ``text`` stored with it."""

    spec: Any
    text: str
    source: str = "<sweep>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Sweep":
        """Read and validate a sweep file (:class:`raydyn.errors.SpecError` naming every problem)."""
        from raydyn.spec import load_sweep

        spec, text = load_sweep(path)
        return cls(spec, text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<sweep>") -> "Sweep":
        from raydyn.spec import parse_sweep

        return cls(parse_sweep(text, source), text, source)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sweep":
        """A sweep from a mapping with the sweep file's keys (name, task, train, parameters, ...)."""
        import yaml

        if not isinstance(d, dict):
            raise SpecError(f"Sweep.from_dict: expected a mapping with keys name, task, train, ...; got "
                            f"{type(d).__name__}")
        return cls.from_text(yaml.safe_dump(d, sort_keys=False), "<dict>")

    @property
    def name(self) -> str:
        return self.spec.name

    def runs(self) -> list[Any]:
        """Every run of a grid/random sweep (:class:`raydyn.spec.RunConfig`: ``.run_id``, ``.config``)."""
        return self.spec.expand()

    def __repr__(self) -> str:
        return f"Sweep({self.spec.name!r}, method={self.spec.method!r}, source={self.source!r})"


@dataclass(frozen=True)
class SweepSummary:
    """What a :func:`run_sweep` call did."""

    name: str
    store: str
    total: int
    skipped: int
    trained: int
    diverged: int
    failed_populations: tuple[str, ...]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.failed_populations


def run_sweep(sweep: Sweep | str | Path | dict[str, Any], store: str | None = None, address: str | None = None,
              *, num_cpus: int | None = None, max_failures: int = 2,
              progress: Callable[[dict[str, Any]], None] | None = None) -> SweepSummary:
    """Train every run of ``sweep`` not already in ``store`` (default ``$RAYDYN_STORE`` or ./raydyn-results).

    ``sweep``: a :class:`Sweep`, a sweep-file path or a mapping. ``address``: a Ray cluster
    (default ``$RAY_ADDRESS``, else an embedded local Ray). ``progress(info)`` gets runs done/total.
    Returns a :class:`SweepSummary`; a trial that failed is listed there, not raised.
    """
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep as _run

    if isinstance(sweep, dict):
        sweep = Sweep.from_dict(sweep)
    elif not isinstance(sweep, Sweep):
        sweep = Sweep.from_yaml(sweep)
    st = open_store(store)
    out = _run(sweep.spec, sweep.text, st, address=address, num_cpus=num_cpus, progress=progress,
               max_failures=max_failures)
    return SweepSummary(out.name, st.uri, out.total, out.skipped, out.trained, out.diverged,
                        tuple(out.failed_populations), out.elapsed_s)
