"""Swept-axis helpers shared by the aggregations and their drawings: value order and log spacing.

:func:`sort_key` orders the values of an axis (numbers ascending, then text); :func:`is_log_spaced`
says whether an axis is laid out on a log scale (phase maps, categorical maps, curves, the report).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["sort_key", "is_log_spaced", "GridAxes"]


def sort_key(v: Any) -> tuple[int, Any]:
    """Order of an axis's values: numbers ascending, then everything else by its text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def is_log_spaced(values: Sequence[Any]) -> bool:
    """True for positive numeric values spanning at least a decade, or with near-constant ratios."""
    try:
        v = np.array(sorted(float(x) for x in values))
    except (TypeError, ValueError):
        return False
    if len(v) < 2 or (v <= 0).any():
        return False
    if v[-1] / v[0] >= 10:
        return True
    if len(v) < 3:
        return False
    r = v[1:] / v[:-1]
    d = np.diff(v)
    return bool(np.ptp(r) / r.mean() < 0.05 and np.ptp(d) / d.mean() > 0.05)


@dataclass
class GridAxes:
    """What every map over two swept axes shares: the metric drawn, the x and y axes and their values in
    drawing order, and the facet columns with one tuple of values per panel."""

    metric: str
    x: str
    y: str
    facets: list[str]
    facet_values: list[tuple[Any, ...]]
    x_values: list[Any]
    y_values: list[Any]
