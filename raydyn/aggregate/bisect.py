"""Adaptive refinement of phase boundaries (ask/tell). Pure: no Ray, no files.

Start from labelled points on an axis (a coarse grid), then repeatedly:
``ask(n)`` proposes up to ``n`` new axis values where the label changes between
neighbours (bisection -- geometric on a log axis), the caller evaluates them
(e.g. ``raydyn sweep refine`` runs them on Ray and classifies the runs) and
``tell(values, labels)`` adds the results. It stops proposing when every
boundary's interval is below the tolerance, or the budget is spent.

Tolerance: on a linear axis a boundary is resolved when ``upper - lower <= tol``;
on a log axis when ``upper / lower <= 1 + tol`` (a relative tolerance).

With ``n`` larger than the number of open boundaries, a batch splits the widest
gaps first and then splits the halves again (parallel n-section), so a batch of
``n`` points shrinks one interval about ``n + 1``-fold.

Seeds: tell the same value several times. When seeds disagree at a point the
boundary interval is widened (see :mod:`raydyn.aggregate.boundary`); gaps narrower
than ``tol / 4`` are never split, so a stochastic band wider than the tolerance
ends refinement there (that boundary is reported ``stuck``) instead of spending
the whole budget on noise.

:class:`GridRefiner` does the same along every row of a 2-D grid, spending one
shared budget on the widest gaps across all rows.
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from raydyn.aggregate.boundary import (
    Boundary,
    LogArg,
    _pairs,
    _resolve_log,
    axis_distance,
    axis_midpoint,
    find_boundaries,
)

__all__ = ["Refiner", "GridRefiner", "dense_grid_size"]


def _tol_dist(tol: float, log: bool) -> float:
    """Tolerance as a distance in the units of :func:`axis_distance`."""
    return math.log1p(tol) if log else tol


class Refiner:
    """Ask/tell bisection of the phase boundaries on one axis.

    Args:
        axis_values: (n,) initial axis values (n >= 2), repeats allowed.
        labels: (n,) initial labels; each a phase name or a sequence of seed labels.
        log: log-spaced axis (geometric midpoints, relative tolerance); ``"auto"``
            guesses from the initial values.
        tol: resolution target, see the module docstring (> 0).
        budget: maximum number of new values to propose in total (``None``: no cap).

    Attributes:
        log_: the resolved axis scale.
        n_asked_: values proposed so far; ``n_told_`` labels received so far
            (including the initial ones).
    """

    def __init__(
        self,
        axis_values: Any,
        labels: Any,
        log: LogArg = "auto",
        tol: float = 0.05,
        budget: int | None = None,
    ) -> None:
        pairs = _pairs(axis_values, labels)
        xs = np.unique([x for x, _ in pairs])
        if xs.size < 2:
            raise ValueError(f"axis_values must hold at least 2 distinct values, got {xs.size}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}")
        self.log_ = _resolve_log(log, xs)
        self.tol = float(tol)
        self.budget = budget
        self._pairs: list[tuple[float, str]] = list(pairs)
        self._pending: set[float] = set()
        self.n_asked_ = 0

    # ------------------------------------------------------------------ state
    @property
    def n_told_(self) -> int:
        return len(self._pairs)

    @property
    def budget_left(self) -> int | None:
        """Proposals left in the budget (``None`` when uncapped)."""
        return None if self.budget is None else self.budget - self.n_asked_

    @property
    def pending(self) -> list[float]:
        """Values asked for but not told yet, sorted."""
        return sorted(self._pending)

    def points(self) -> tuple[np.ndarray, list[str]]:
        """All told ``(values, labels)`` pairs as arrays (one entry per label)."""
        return np.array([x for x, _ in self._pairs]), [s for _, s in self._pairs]

    def boundaries(self) -> list[Boundary]:
        """Current boundaries from all told points (:func:`find_boundaries`)."""
        xs, labs = self.points()
        return find_boundaries(xs, labs, log=self.log_)

    def is_resolved(self, b: Boundary) -> bool:
        """True if ``b``'s interval is within the tolerance."""
        return b.width <= _tol_dist(self.tol, self.log_) * (1 + 1e-9)

    @property
    def done(self) -> bool:
        """True when nothing is left to ask: every boundary resolved or stuck, or budget spent."""
        return not self._candidates(1)

    # ------------------------------------------------------------------ proposals
    def _candidates(self, n: int) -> list[tuple[float, float]]:
        """Up to ``n`` proposals as ``(gap width, value)``, widest first; no side effects."""
        if n <= 0 or (self.budget_left is not None and self.budget_left <= 0):
            return []
        if self.budget_left is not None:
            n = min(n, self.budget_left)
        tol_d = _tol_dist(self.tol, self.log_)
        told = {x for x, _ in self._pairs}
        grid = np.array(sorted(told | self._pending))
        heap: list[tuple[float, float, float]] = []
        seen: set[tuple[float, float]] = set()
        for b in self.boundaries():
            if self.is_resolved(b):
                continue
            lo_i = int(np.searchsorted(grid, b.lower))
            hi_i = int(np.searchsorted(grid, b.upper))
            for a, c in zip(grid[lo_i:hi_i], grid[lo_i + 1 : hi_i + 1]):
                w = axis_distance(a, c, self.log_)
                if w > tol_d / 4 and (a, c) not in seen:
                    seen.add((a, c))
                    heapq.heappush(heap, (-w, float(a), float(c)))
        out: list[tuple[float, float]] = []
        while heap and len(out) < n:
            negw, a, c = heapq.heappop(heap)
            mid = axis_midpoint(a, c, self.log_)
            if not (a < mid < c):  # floating-point exhaustion
                continue
            out.append((-negw, mid))
            for p, q in ((a, mid), (mid, c)):
                w = axis_distance(p, q, self.log_)
                if w > tol_d / 4:
                    heapq.heappush(heap, (-w, p, q))
        return out

    def _mark_asked(self, values: Iterable[float]) -> None:
        for v in values:
            self._pending.add(float(v))
            self.n_asked_ += 1

    def ask(self, n: int = 1) -> list[float]:
        """Propose up to ``n`` new axis values (fewer when done or out of budget), sorted.

        Proposals become *pending* until told; pending values split gaps like
        told ones, so consecutive ``ask`` calls never repeat a value.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        vals = sorted(v for _, v in self._candidates(int(n)))
        self._mark_asked(vals)
        return vals

    def tell(self, values: Any, labels: Any) -> "Refiner":
        """Add evaluated points (any values, asked or not; repeats = more seeds). Returns self."""
        pairs = _pairs(values, labels)
        if self.log_ and any(x <= 0 for x, _ in pairs):
            raise ValueError("a log axis needs positive values")
        self._pairs.extend(pairs)
        for x, _ in pairs:
            self._pending.discard(x)
        return self

    def run(self, oracle: Callable[[float], Any], batch_size: int = 1, max_rounds: int = 10_000) -> "Refiner":
        """Drive ask/tell with a pure ``oracle(value) -> label`` (or list of seed labels)."""
        for _ in range(max_rounds):
            vals = self.ask(batch_size)
            if not vals:
                break
            self.tell(vals, [oracle(v) for v in vals])
        return self

    def stuck(self) -> list[Boundary]:
        """Unresolved boundaries whose gaps are all below ``tol/4`` (noise bands wider than ``tol``)."""
        tol_d = _tol_dist(self.tol, self.log_)
        out = []
        xs = np.array(sorted({x for x, _ in self._pairs} | self._pending))
        for b in self.boundaries():
            if self.is_resolved(b):
                continue
            inside = xs[(xs >= b.lower) & (xs <= b.upper)]
            if all(axis_distance(a, c, self.log_) <= tol_d / 4 for a, c in zip(inside[:-1], inside[1:])):
                out.append(b)
        return out


class GridRefiner:
    """Refine along ``x`` in every row of a 2-D grid, with one shared budget.

    Args:
        x_values: (nx,) grid values along the refined axis.
        y_values: (ny,) row coordinates (kept fixed).
        labels: (ny, nx) nested sequence; ``labels[i][j]`` is the label (or seed
            labels) at ``(x_values[j], y_values[i])``.
        log, tol, budget: as for :class:`Refiner` (``log`` refers to the x axis).

    ``ask(n)`` returns ``(x, y)`` pairs (the widest gaps over all rows first);
    ``tell(points, labels)`` takes the same pairs.
    """

    def __init__(
        self,
        x_values: Any,
        y_values: Any,
        labels: Sequence[Sequence[Any]],
        log: LogArg = "auto",
        tol: float = 0.05,
        budget: int | None = None,
    ) -> None:
        xs = np.asarray(x_values, dtype=float)
        ys = np.asarray(y_values, dtype=float)
        if ys.ndim != 1 or len(set(ys.tolist())) != ys.size:
            raise ValueError("y_values must be 1-D with distinct values")
        labels = list(labels)
        if len(labels) != ys.size:
            raise ValueError(f"labels has {len(labels)} rows, expected len(y_values) = {ys.size}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be a non-negative integer or None, got {budget!r}")
        self.budget = budget
        self.n_asked_ = 0
        self.rows_: dict[float, Refiner] = {}
        for y, row in zip(ys.tolist(), labels):
            row = list(row)
            if len(row) != xs.size:
                raise ValueError(f"row y={y} has {len(row)} labels, expected len(x_values) = {xs.size}")
            self.rows_[y] = Refiner(xs, row, log=log, tol=tol, budget=None)

    @property
    def n_told_(self) -> int:
        return sum(r.n_told_ for r in self.rows_.values())

    def ask(self, n: int = 1) -> list[tuple[float, float]]:
        """Up to ``n`` new ``(x, y)`` points, widest gaps (relative to each row's scale) first."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if self.budget is not None:
            n = min(n, self.budget - self.n_asked_)
        if n <= 0:
            return []
        cands = [(w, x, y) for y, r in self.rows_.items() for w, x in r._candidates(n)]
        cands.sort(key=lambda t: (-t[0], t[2], t[1]))
        chosen = cands[:n]
        for y in {y for _, _, y in chosen}:
            self.rows_[y]._mark_asked([x for _, x, yy in chosen if yy == y])
        self.n_asked_ += len(chosen)
        return sorted(((x, y) for _, x, y in chosen), key=lambda t: (t[1], t[0]))

    def tell(self, points: Sequence[tuple[float, float]], labels: Sequence[Any]) -> "GridRefiner":
        """Add evaluated ``(x, y)`` points; ``y`` must be one of the grid's rows."""
        points, labels = list(points), list(labels)
        if len(points) != len(labels):
            raise ValueError(f"points and labels differ in length: {len(points)} vs {len(labels)}")
        for (x, y), lab in zip(points, labels):
            if float(y) not in self.rows_:
                raise ValueError(f"y={y} is not a row of this grid; rows: {sorted(self.rows_)}")
            self.rows_[float(y)].tell([x], [lab])
        return self

    def boundaries(self) -> dict[float, list[Boundary]]:
        """Boundaries per row, keyed by ``y``."""
        return {y: r.boundaries() for y, r in self.rows_.items()}

    @property
    def done(self) -> bool:
        if self.budget is not None and self.n_asked_ >= self.budget:
            return True
        return all(r.done for r in self.rows_.values())

    def run(
        self, oracle: Callable[[float, float], Any], batch_size: int = 1, max_rounds: int = 100_000
    ) -> "GridRefiner":
        """Drive ask/tell with a pure ``oracle(x, y) -> label``."""
        for _ in range(max_rounds):
            pts = self.ask(batch_size)
            if not pts:
                break
            self.tell(pts, [oracle(x, y) for x, y in pts])
        return self


def dense_grid_size(lo: float, hi: float, tol: float, log: bool) -> int:
    """Points of a uniform grid on ``[lo, hi]`` whose spacing meets ``tol`` (same
    convention as :class:`Refiner`): the dense-grid cost refinement is compared with."""
    d = axis_distance(lo, hi, log)
    return int(math.ceil(d / _tol_dist(tol, log) - 1e-9)) + 1
