"""The plain PyTorch loop: one run, ``nn.Module`` + ``torch.optim``, no vectorisation.

It is the yardstick for the population trainer: same initialisation, same data
order (:class:`BatchStream`), same losses, and the optimiser, learning-rate schedulers
and gradient clipping are PyTorch's own (``torch.optim``, ``torch.optim.lr_scheduler``,
``torch.nn.utils.clip_grad_norm_``). The model trains in ``train()`` mode and is evaluated
in ``eval()`` mode, as in any PyTorch loop (batch norm running statistics, dropout).
Tests check that a population member's trajectory equals this loop's, and the
throughput benchmark uses it as the "bare sequential PyTorch loop".
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from raydyn.tasks.data import Dataset
from raydyn.train.objectives import accuracy, loss_fn
from raydyn.train.curvature import curvature_batch, member_ntk
from raydyn.tasks.build import init_model, load_data
from raydyn.train.population import BatchStream, member_embed_wd


def make_scheduler(cfg: dict[str, Any], opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """PyTorch's scheduler for ``train.schedule`` / ``warmup_steps``, stepped once after every ``opt.step()``
    (None for a constant rate without warm-up)."""
    from torch.optim import lr_scheduler as S

    kind, w, steps = cfg.get("schedule") or "constant", int(cfg.get("warmup_steps") or 0), int(cfg["steps"])
    final = float(cfg.get("final_lr_factor") or 0.0)
    T = steps - w
    if kind == "cosine":
        base = opt.param_groups[0]["lr"]
        if len({g["lr"] for g in opt.param_groups}) > 1:
            main = S.LambdaLR(opt, lambda s: final + (1 - final) * (1 + math.cos(math.pi * s / T)) / 2)
        else:
            main = S.CosineAnnealingLR(opt, T_max=T, eta_min=final * base)
    elif kind == "linear":
        main = S.LinearLR(opt, start_factor=1.0, end_factor=final, total_iters=T)
    elif kind == "step":
        main = S.StepLR(opt, step_size=int(cfg["decay_every"]), gamma=float(cfg.get("decay_gamma", 0.1)))
    else:
        main = None
    if w == 0:
        return main
    warm = S.LinearLR(opt, start_factor=1.0 / (w + 1), end_factor=1.0, total_iters=w)
    if main is None:
        return warm
    return S.SequentialLR(opt, [warm, main], milestones=[w])


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
        model.eval()  # the population measures lambda0 in eval mode too (running statistics untouched)
        lr = lr / member_ntk(model, params, dict(model.named_buffers()), x_curv)[0]
    opt = make_optimizer(cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=lr)
    sched = make_scheduler(cfg, opt)
    clip = cfg.get("clip_grad_norm")
    fixed_norm = cfg.get("fixed_norm") is not None  # constrained training: hold the initial total norm
    norm0 = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters()))
    stream = BatchStream(len(data.x_train), cfg["batch_size"], cfg["seed"])
    loss_name = cfg["loss"] or data.default_loss
    n_eval = min(cfg["eval_size"], len(data.x_train))
    steps, every, eval_every = int(cfg["steps"]), int(cfg["record_every"]), int(cfg["eval_every"])
    out: dict[str, list] = {"step": [], "train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [],
                            "weights": [], "batch_loss": [], "lrs": []}

    for step in range(steps + 1):
        idx = stream.next()
        model.train()
        loss = loss_fn(loss_name, model(data.x_train[idx]), data.y_train[idx])
        eval_now = step % eval_every == 0 or step == steps
        if record and (eval_now or step % every == 0):
            model.eval()
            with torch.no_grad():
                for split, x, y in (("train", data.x_train[:n_eval], data.y_train[:n_eval]), ("test", data.x_test, data.y_test)):
                    o = model(x)
                    out[f"{split}_loss"].append(float(loss_fn(loss_name, o, y)) if eval_now else float("nan"))
                    out[f"{split}_acc"].append(float(accuracy(data.kind, o, y)) if eval_now else float("nan"))
                out["step"].append(step)
                out["batch_loss"].append(float(loss))
                out["lrs"].append(float(opt.param_groups[0]["lr"]))
                out["weights"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(clip))
        opt.step()
        if sched is not None:
            sched.step()
        if fixed_norm:
            with torch.no_grad():
                scale = norm0 / torch.sqrt(sum(p.pow(2).sum() for p in model.parameters()))
                for p in model.parameters():
                    p.mul_(scale)
    out["weights"] = np.stack(out["weights"]) if out["weights"] else np.empty((0, 0))
    out["lr"] = lr  # the base learning rate it trained at (lr / lambda0 with lr_units: ntk); "lrs": per record
    out["model"] = model
    return out
