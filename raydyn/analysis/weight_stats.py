"""Weight statistics of Hu et al. (2023), computed for a whole population at once.

"Latent State Models of Training Dynamics" (Hu, Chen, Saphra, Cho; TMLR 2023) describe
each checkpoint of a network by 14 summary statistics of its weights and fit an HMM over
the resulting time series (see :mod:`raydyn.analysis.hmm`). This module computes those
statistics for ``P`` population members in one pass, from parameters stacked along a
leading axis (as ``torch.func.stack_module_state`` returns them), so that it is cheap
enough to run inside the training recorder.

Which parameters count as what (after dropping the population axis):

* **weight matrices** -- parameters with ``ndim >= 2``. A parameter of shape
  ``(out, d1, d2, ...)`` (e.g. a conv kernel ``(out, in, kh, kw)``) is reshaped to the
  matrix ``(out, d1*d2*...)``. Embedding tables count as weight matrices.
* **biases** -- parameters with ``ndim == 1``. This follows the brief literally, so
  LayerNorm/BatchNorm gains (1-D) are pooled with the biases; pass a filtered dict if
  that is not wanted.
* parameters with ``ndim == 0`` (learned scalars) are ignored.

Per-matrix statistics are averaged (unweighted) over all weight matrices; the
distribution statistics pool every entry of every weight matrix (resp. bias).

Columns (see :data:`FEATURES`), all dimensionless unless noted; each is a tensor ``(P,)``:

==================== =====================================================================
``w_l1``             mean over matrices of the entrywise L1 norm ``sum |W_ij|``
``w_l2``             mean over matrices of the Frobenius norm
``w_trace``          mean over matrices of ``sum_i W_ii`` (non-square: sum of the diagonal)
``w_spectral``       mean over matrices of the largest singular value
``w_l1_l2``          mean over matrices of ``L1 / L2`` ("code sparsity"; 0 for a zero matrix)
``w_trace_spectral`` mean over matrices of ``trace / spectral`` ("computational sparsity";
                     0 for a zero matrix)
``sv_mean``          mean over matrices of the mean singular value (values < ``sv_floor``
                     set to 0 first)
``sv_var``           mean over matrices of the variance (unbiased, ``n-1``) of the singular
                     values (floored as above). A matrix with a single singular value has
                     no unbiased variance and is skipped in this mean (as in the reference
                     code, which uses ``nanmean``); NaN if every matrix is so.
``w_mean``           mean of all weight-matrix entries, pooled
``w_median``         median of all weight-matrix entries, pooled (torch convention: the
                     lower of the two middle values for an even count, as in the reference)
``w_var``            unbiased variance of all weight-matrix entries, pooled
``b_mean``           mean of all bias entries, pooled; NaN if the model has no biases
``b_median``         median of all bias entries (lower middle); NaN if no biases
``b_var``            unbiased variance of all bias entries; NaN if no biases or only one
==================== =====================================================================

Population members whose parameters contain a non-finite value (diverged runs) get NaN in
every column; the other members are unaffected (the SVD never sees the bad values).

Differences from the reference code (github michahu/modeling-training, ``src/metrics.py``):
it splits attention K/Q/V weights per head and summarises conv kernels by per-filter
L1/L2 only; here every parameter with ``ndim >= 2`` is one matrix, reshaped as above.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["FEATURES", "weight_stats"]

FEATURES: tuple[str, ...] = (
    "w_l1",
    "w_l2",
    "w_trace",
    "w_spectral",
    "w_l1_l2",
    "w_trace_spectral",
    "sv_mean",
    "sv_var",
    "w_mean",
    "w_median",
    "w_var",
    "b_mean",
    "b_median",
    "b_var",
)
"""Column names returned by :func:`weight_stats`, in a stable order."""

_MATRIX_FEATURES = FEATURES[:8]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (a zero matrix has no defined ratio)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def _matrix_stats(w: torch.Tensor, sv_floor: float) -> dict[str, torch.Tensor]:
    """Per-member statistics of one stacked weight matrix ``w`` of shape ``(P, m, n)``."""
    l1 = w.abs().sum(dim=(1, 2))
    l2 = torch.linalg.vector_norm(w, ord=2, dim=(1, 2))
    trace = torch.diagonal(w, dim1=1, dim2=2).sum(dim=1)
    sv = torch.linalg.svdvals(w)  # (P, min(m, n)), descending
    spectral = sv[:, 0]
    sv = torch.where(sv < sv_floor, torch.zeros_like(sv), sv)
    if sv.shape[1] > 1:
        sv_var = sv.var(dim=1, correction=1)
    else:
        sv_var = torch.full_like(spectral, float("nan"))
    return {
        "w_l1": l1,
        "w_l2": l2,
        "w_trace": trace,
        "w_spectral": spectral,
        "w_l1_l2": _safe_ratio(l1, l2),
        "w_trace_spectral": _safe_ratio(trace, spectral),
        "sv_mean": sv.mean(dim=1),
        "sv_var": sv_var,
    }


def _pooled_stats(x: torch.Tensor | None, p: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Mean, lower median and unbiased variance of ``x`` ``(P, N)`` along N; NaN if absent."""
    if x is None or x.shape[1] == 0:
        nan = torch.full((p,), float("nan"), dtype=dtype, device=device)
        return nan, nan, nan
    var = x.var(dim=1, correction=1) if x.shape[1] > 1 else torch.full((p,), float("nan"), dtype=dtype, device=device)
    return x.mean(dim=1), x.median(dim=1).values, var


@torch.no_grad()
def weight_stats(params: Mapping[str, torch.Tensor], *, sv_floor: float = 1e-5) -> dict[str, torch.Tensor]:
    """Hu et al. weight statistics for ``P`` stacked population members.

    Args:
        params: parameter name -> tensor of shape ``(P, *param_shape)``; every tensor must
            share the same ``P``. Gradients are ignored (computed under ``no_grad``).
            Half-precision inputs are computed in float32.
        sv_floor: singular values below this are set to 0 before ``sv_mean``/``sv_var``
            (1e-5 in the paper). The spectral norm uses the raw largest singular value.

    Returns:
        dict with exactly the keys of :data:`FEATURES`, in that order; each value is a
        tensor of shape ``(P,)`` on the input device, dtype float32 (or float64 if the
        inputs are float64). See the module docstring for definitions and NaN rules.

    Raises:
        ValueError: ``params`` is empty, has mismatched population sizes, or has no
            weight matrix (no parameter with ``ndim >= 2`` after the population axis).
    """
    if not params:
        raise ValueError("params is empty; expected name -> tensor of shape (P, *param_shape)")
    sizes = {name: t.shape[0] if t.ndim > 0 else None for name, t in params.items()}
    if any(s is None for s in sizes.values()):
        bad = [n for n, s in sizes.items() if s is None]
        raise ValueError(f"params {bad} are 0-d; every tensor needs a leading population axis P")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"params have different population sizes (leading axis): {sizes}")
    p = next(iter(sizes.values()))

    dtype = torch.float64 if any(t.dtype == torch.float64 for t in params.values()) else torch.float32
    mats: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for t in params.values():
        t = t.detach().to(dtype)
        if t.ndim >= 3:
            mats.append(t.reshape(p, t.shape[1], -1))
        elif t.ndim == 2:
            biases.append(t)
    if not mats:
        raise ValueError(
            f"params {list(params)} contain no weight matrix (a parameter with ndim >= 2 after the "
            "population axis); weight statistics need at least one"
        )
    device = mats[0].device

    # Diverged members: mask them out so the SVD never sees inf/NaN, and report NaN for them.
    finite = torch.ones(p, dtype=torch.bool, device=device)
    for t in mats + biases:
        finite &= torch.isfinite(t.reshape(p, -1)).all(dim=1)
    if not bool(finite.all()):
        keep = finite.view(p, 1, 1)
        mats = [torch.where(keep, m, torch.zeros_like(m)) for m in mats]
        biases = [torch.where(finite.view(p, 1), b, torch.zeros_like(b)) for b in biases]

    per_matrix = [_matrix_stats(m, sv_floor) for m in mats]
    out: dict[str, torch.Tensor] = {}
    for name in _MATRIX_FEATURES:
        stacked = torch.stack([s[name] for s in per_matrix], dim=0)  # (n_matrices, P)
        out[name] = stacked.nanmean(dim=0) if name == "sv_var" else stacked.mean(dim=0)

    all_w = torch.cat([m.reshape(p, -1) for m in mats], dim=1)
    all_b = torch.cat(biases, dim=1) if biases else None
    out["w_mean"], out["w_median"], out["w_var"] = _pooled_stats(all_w, p, dtype, device)
    out["b_mean"], out["b_median"], out["b_var"] = _pooled_stats(all_b, p, dtype, device)

    if not bool(finite.all()):
        nan = torch.tensor(float("nan"), dtype=dtype, device=device)
        out = {k: torch.where(finite, v, nan) for k, v in out.items()}
    return {k: out[k] for k in FEATURES}
