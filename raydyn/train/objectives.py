"""Losses and accuracies, written for one model's batch so they vmap over a population."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_fn(name: str, out: torch.Tensor, y: torch.Tensor, vmapped: bool = False) -> torch.Tensor:
    """Mean loss of a batch. out: (B, C) logits or (B, d) predictions; y as in Dataset. ``vmapped``: the call
    runs under ``torch.func.vmap`` (a population), where cross entropy takes the form vmap batches natively."""
    if name == "cross_entropy":
        if vmapped and out.dim() == y.dim() + 1:
            # F.cross_entropy's value, written with ops that vmap batches natively: under vmap F.cross_entropy
            # runs through a decomposition of nll_loss, and a population step costs ~12% more (MLP on digits,
            # P=32). Outside vmap F.cross_entropy's fused kernel is the faster one (40 vs 77 us at 64 x 10).
            # shifted by the (detached: the loss does not depend on it) max logit first, as log_softmax does, so
            # that float32 logits of size 1e4 lose no digits
            z = out - out.detach().amax(-1, keepdim=True)
            return (torch.logsumexp(z, -1) - torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1)).mean()
        return F.cross_entropy(out, y)
    if name == "mse":
        if y.dtype == torch.long:  # classification with one-hot targets
            # (not F.one_hot: it reads the max label with .item(), which vmap cannot do)
            y = (y.unsqueeze(-1) == torch.arange(out.shape[-1], device=y.device)).to(out.dtype)
        return 0.5 * ((out - y.reshape(out.shape)) ** 2).sum(-1).mean()
    if name == "hinge":  # binary, y in {-1, +1}, scalar output
        return torch.clamp(1 - y * out.reshape(y.shape), min=0).mean()
    raise ValueError(f"unknown loss {name!r}")


def accuracy(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction correct in [0, 1]; NaN for regression."""
    if kind == "classification":
        return (out.argmax(-1) == y).to(out.dtype).mean()
    if kind == "binary":
        return (torch.sign(out.reshape(y.shape)) == y).to(out.dtype).mean()
    return torch.full((), float("nan"), dtype=out.dtype)
