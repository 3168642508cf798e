"""Aggregation of runs over swept axes: phase-map grids, label boundaries, level crossings, curves.

Pure info (tables in, dataclasses out): :mod:`.maps` (a numeric metric per cell), :mod:`.categorical`
(a label per cell, boundaries along an axis), :mod:`.boundary` (boundaries of labelled points),
:mod:`.levels` (where a metric crosses a level), :mod:`.curves` (a metric over steps per group),
:mod:`.bisect` (ask/tell bisection of boundaries, used by ``raydyn sweep refine``), :mod:`.axes`
(axis order and log spacing). The phase rules are :mod:`raydyn.analysis.phase`; the drawings are in
:mod:`raydyn.plots` (:mod:`raydyn.plots.maps`, :mod:`raydyn.plots.curves`).
"""
