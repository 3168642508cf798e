"""The plain PyTorch loop: one run, ``nn.Module`` + ``torch.optim``, no vectorisation.

It is the yardstick for the population trainer: same initialisation, same data
order (:class:`BatchStream`), same losses, and the optimiser is PyTorch's own.
Tests check that a population member's trajectory equals this loop's, and the
throughput benchmark uses it as the "bare sequential PyTorch loop".
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raydyn.tasks.data import Dataset
from raydyn.train.objectives import accuracy, loss_fn
from raydyn.train.curvature import curvature_batch, member_ntk
from raydyn.train.population import BatchStream, init_model, load_data, member_embed_wd


def make_optimizer(cfg: dict[str, Any], params, lr: float | None = None) -> torch.optim.Optimizer:
    """PyTorch's optimiser for one run. ``params``: parameters, or ``(name, parameter)`` pairs, in which case
    parameters named ``embed*`` form a second param group with ``embed_lr`` / ``embed_weight_decay``.
    ``lr`` overrides ``cfg['lr']`` (the actual step size with ``lr_units: ntk``)."""
    lr = cfg["lr"] if lr is None else lr
    params = list(params)
    if params and isinstance(params[0], tuple):
        embed = [p for n, p in params if n.startswith("embed")]
        rest = [p for n, p in params if not n.startswith("embed")]
        groups = [{"params": rest}]
        if embed:
            groups.append({"params": embed, "weight_decay": member_embed_wd(cfg),
                           "lr": cfg["embed_lr"] if cfg.get("embed_lr") is not None else lr})
        params = groups
    kind = cfg["optimizer"]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], dampening=cfg["dampening"],
                               weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])


def train_single(cfg: dict[str, Any], data: Dataset | None = None, record: bool = True) -> dict[str, Any]:
    """Train one run; returns recorded steps, train/test loss and accuracy, flat weights (if record)."""
    data = data if data is not None else load_data(cfg)
    model = init_model(cfg, data)
    lr = cfg["lr"]
    if cfg.get("lr_units") == "ntk":  # lr is eta*lambda0: train at lr / lambda0 (same lambda0 as the population)
        x_curv, _ = curvature_batch(data, cfg["curvature_batch"])
        params = {k: v.detach() for k, v in model.named_parameters()}
        lr = lr / member_ntk(model, params, dict(model.named_buffers()), x_curv)[0]
    opt = make_optimizer(cfg, model.named_parameters(), lr=lr)
    fixed_norm = cfg.get("fixed_norm") is not None  # constrained training: hold the initial total norm
    norm0 = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters()))
    stream = BatchStream(len(data.x_train), cfg["batch_size"], cfg["seed"])
    loss_name = cfg["loss"] or data.default_loss
    n_eval = min(cfg["eval_size"], len(data.x_train))
    steps, every, eval_every = int(cfg["steps"]), int(cfg["record_every"]), int(cfg["eval_every"])
    out: dict[str, list] = {"step": [], "train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [], "weights": []}

    for step in range(steps + 1):
        idx = stream.next()
        loss = loss_fn(loss_name, model(data.x_train[idx]), data.y_train[idx])
        eval_now = step % eval_every == 0 or step == steps
        if record and (eval_now or step % every == 0):
            with torch.no_grad():
                for split, x, y in (("train", data.x_train[:n_eval], data.y_train[:n_eval]), ("test", data.x_test, data.y_test)):
                    o = model(x)
                    out[f"{split}_loss"].append(float(loss_fn(loss_name, o, y)) if eval_now else float("nan"))
                    out[f"{split}_acc"].append(float(accuracy(data.kind, o, y)) if eval_now else float("nan"))
                out["step"].append(step)
                out["weights"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if fixed_norm:
            with torch.no_grad():
                scale = norm0 / torch.sqrt(sum(p.pow(2).sum() for p in model.parameters()))
                for p in model.parameters():
                    p.mul_(scale)
    out["weights"] = np.stack(out["weights"]) if out["weights"] else np.empty((0, 0))
    out["lr"] = lr
    return out
