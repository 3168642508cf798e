"""Neuron transformation modes in the recorder (``train.record: [neurons]``).

At every record, for every member, the OPT / NPT / dead fractions of each ReLU-like activation
layer (:func:`raydyn.analysis.neurons.neuron_modes`: OPT when the pre-activation lies in the activation's
order-preserving range (ReLU: > 0) on every reference sample, NPT on some, dead on none; raydyn's operationalisation of Lin et al. 2025) on a fixed reference set:
the first ``REF_SIZE`` training inputs. Columns of the ``metrics`` table, one list per row with
one value per activation layer (in ``model.named_modules()`` order, so populations of different
depth share one schema): ``neuron_opt``, ``neuron_npt``, ``neuron_dead``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

REF_SIZE = 256


class MemberModel(nn.Module):
    """One population member as an ``nn.Module``: the shared (meta) base module run with that
    member's parameter and buffer slices, so module hooks on the base see this member's forward."""

    def __init__(self, base: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base
        self._p, self._b = params, buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (self._p, self._b), (x,))


def layer_names(model: nn.Module) -> list[str]:
    """The activation layers the probe reports, in list-column order."""
    from raydyn.analysis.neurons import RELU_LIKE

    return [n for n, m in model.named_modules() if isinstance(m, RELU_LIKE)]


@torch.no_grad()
def neurons_probe(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """(P, L) OPT/NPT/dead fractions per member and activation layer (NaN rows for unrecorded members)."""
    from raydyn.analysis.neurons import neuron_modes

    base, params, buffers, mask = ctx["model"], ctx["params"], ctx.get("buffers") or {}, ctx["mask"]
    names = layer_names(base)
    P = mask.shape[0]
    dtype = next(iter(params.values())).dtype
    out = {k: torch.full((P, len(names)), float("nan"), dtype=torch.float64)
           for k in ("neuron_opt", "neuron_npt", "neuron_dead")}
    if not names:
        return out
    x, _ = ctx["data"].head("train", REF_SIZE)
    for i in torch.nonzero(mask).flatten().tolist():
        member = MemberModel(base, {k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()})
        if not all(torch.isfinite(v[i]).all() for v in params.values()):
            continue  # a diverged member: no modes
        modes = neuron_modes(member, x.to(dtype) if x.is_floating_point() else x)  # (float dtype of the params)
        for j, n in enumerate(names):
            opt, npt, dead = modes["base." + n]
            out["neuron_opt"][i, j], out["neuron_npt"][i, j], out["neuron_dead"][i, j] = opt, npt, dead
    return out
