"""Input checks shared by the pure analyses (arrays in, results out).

:func:`check_trajectories` is the one validator of a set of recorded trajectories --
``(T_i, D)`` arrays, one per run or initialisation -- used by :mod:`raydyn.analysis.hmm`
(sequences of metrics) and :mod:`raydyn.analysis.koopman` (state snapshots): a non-empty
list, every item 2-D and numeric, one shared feature count, at least ``min_length`` time
steps, only finite values. Each caller names things its own way (``sequences[3]``,
``trajectory 3``) so messages point at the argument the user passed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["check_trajectories"]


def check_trajectories(
    trajectories: Sequence,
    *,
    name: str = "trajectories",
    item: str = "{name}[{i}]",
    dim: str = "D",
    min_length: int = 2,
    need: str | None = None,
    time: str = "time step",
    allow_1d: bool = False,
    allow_complex: bool = False,
) -> list[np.ndarray]:
    """Validate a list of ``(T_i, D)`` arrays; return C-contiguous float64 arrays.

    Parameters
    ----------
    trajectories : list or tuple of array-likes (not an ndarray: callers that accept a
        stacked ``(n, T, D)`` array split it first)
    name : the argument's name in messages ("sequences", "trajectories")
    item : how the i-th item is named in messages, a format with ``name`` and ``i``
    dim : the letter of the feature axis in messages ("D", "F")
    min_length : the fewest time steps an item may have
    need : why, in messages (default "need at least {min_length}")
    time : the word for a row in the non-finite message ("time step", "time")
    allow_1d : a 1-D item is one feature, ``(T,) -> (T, 1)``; otherwise it is an error
    allow_complex : complex items stay complex128 instead of being rejected by the cast

    Raises
    ------
    ValueError naming the first offending item, and for non-finite values the first
    (time, feature) index.
    """
    if isinstance(trajectories, np.ndarray) or isinstance(trajectories, str) \
            or not isinstance(trajectories, Sequence):
        raise ValueError(f"{name} must be a list of (T_i, {dim}) arrays, got {type(trajectories).__name__}")
    if len(trajectories) == 0:
        raise ValueError(f"{name} is empty; need at least one (T_i, {dim}) array")
    out: list[np.ndarray] = []
    n_features = None
    for i, x in enumerate(trajectories):
        label = item.format(name=name, i=i)
        a = np.asarray(x)
        if allow_1d and a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"{label} has shape {a.shape}; expected a 2-D (T_i, {dim}) array")
        target = np.complex128 if allow_complex and np.iscomplexobj(a) else np.float64
        try:  # numbers and booleans; object arrays only when they hold numbers
            if a.dtype.kind not in "biufcO":
                raise TypeError
            a = np.ascontiguousarray(a, dtype=target)
        except (TypeError, ValueError):
            raise ValueError(f"{label} has non-numeric dtype {a.dtype}") from None
        if a.shape[1] < 1:
            raise ValueError(f"{label} has no features (shape {a.shape})")
        if n_features is None:
            n_features = a.shape[1]
        elif a.shape[1] != n_features:
            raise ValueError(
                f"{label} has {dim}={a.shape[1]} features but {item.format(name=name, i=0)} has "
                f"{dim}={n_features}; all {name} must share the same features"
            )
        if a.shape[0] < min_length:
            raise ValueError(f"{label} has T={a.shape[0]} time steps; {need or f'need at least {min_length}'}")
        bad = ~np.isfinite(a)
        if bad.any():
            t, f = np.argwhere(bad)[0]
            raise ValueError(
                f"{label} contains NaN or inf: non-finite value at {time} {t}, feature {f}; drop or impute it first"
            )
        out.append(a)
    return out
