"""The population's optimiser: PyTorch's update rules on stacked (P, ...) parameters, per-member
hyperparameters, learning-rate schedules and gradient clipping.

Every rule is written to be exactly PyTorch's (tested against ``torch.optim``,
``torch.optim.lr_scheduler`` and ``torch.nn.utils.clip_grad_norm_``), member by member:

* :data:`UPDATES` -- one function per optimiser kind (``sgd``, ``adam``, ``adamw``), from
  (parameter, gradient, state, hyperparameters) to the new parameter;
* :class:`Schedule` -- each member's learning-rate factor at a step (warm-up, then constant,
  cosine, linear or step decay), computed on the device from (P,) tensors;
* :func:`clip_coefficients` -- each member's ``clip_grad_norm_`` factor.

Shapes: P members; every hyperparameter is a (P,) tensor broadcast against (P, ...) parameters.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

Tensor = torch.Tensor


def _b(v: Tensor, like: Tensor) -> Tensor:
    """(P,) -> (P, 1, ..., 1) to broadcast against ``like`` (P, ...); already that shape: ``v`` itself."""
    if v.dim() == like.dim():
        return v
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class _Flags:
    """What is uniform across a param group's members (read once from the constant (P,) hyperparameters), so
    an update can skip work that changes nothing: g + 0 p, a (1 - 0) factor, a momentum buffer nobody uses.
    Skipping such an operation leaves every result bit-for-bit the same."""

    def __init__(self, hp: dict[str, Tensor]):
        host = {k: v.detach().cpu() for k, v in hp.items()}
        self.no_wd = bool((host["weight_decay"] == 0).all())
        self.all_momentum = bool((host["momentum"] > 0).all())
        self.no_momentum = bool((host["momentum"] == 0).all())
        self.no_dampening = bool((host["dampening"] == 0).all())


def _sgd(p: Tensor, g: Tensor, st: dict[str, Tensor], hp: dict[str, Tensor], lr: Tensor, t: int,
         nesterov: bool, f: _Flags, inplace: bool) -> Tensor | None:
    """torch.optim.SGD: d = g + wd p; with momentum buf = d (first step) else m buf + (1 - dampening) d;
    d = d + m buf (nesterov) or buf; members with momentum 0 use d directly; p - lr d.
    ``inplace``: update ``p`` itself (every member active) and return None; else return the new p."""
    b = lambda v: _b(v, p)  # noqa: E731
    d = g if f.no_wd else g + b(hp["weight_decay"]) * p
    if f.no_momentum:  # as torch: no buffer when momentum is 0
        upd = d
    else:
        if "buf" not in st:
            st["buf"] = d.clone()
        else:
            st["buf"].mul_(b(hp["momentum"])).add_(d if f.no_dampening else (1 - b(hp["dampening"])) * d)
        buf = st["buf"]
        upd = d + b(hp["momentum"]) * buf if nesterov else buf
        if not f.all_momentum:
            upd = torch.where(b(hp["momentum"]) > 0, upd, d)
    step = b(lr) * upd
    if inplace:
        p.sub_(step)
        return None
    return p - step


def _adam_like(decoupled: bool) -> Callable[..., Tensor | None]:
    def update(p: Tensor, g: Tensor, st: dict[str, Tensor], hp: dict[str, Tensor], lr: Tensor, t: int,
               nesterov: bool, f: _Flags, inplace: bool) -> Tensor | None:
        """torch.optim.Adam (L2: g += wd p) / AdamW (decoupled: p *= 1 - lr wd), then the bias-corrected
        moment update with eps added to sqrt(v_hat)."""
        b = lambda v: _b(v, p)  # noqa: E731
        if not decoupled and not f.no_wd:
            g = g + b(hp["weight_decay"]) * p
        if "m" not in st:
            st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        b1, b2 = b(hp["beta1"]), b(hp["beta2"])
        st["m"].mul_(b1).add_((1 - b1) * g)
        st["v"].mul_(b2).add_((1 - b2) * g * g)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = (st["v"].sqrt() / bc2.sqrt()) + b(hp["eps"])
        step = (b(lr) / bc1) * st["m"] / denom
        if inplace:
            if decoupled and not f.no_wd:
                p.mul_(1 - b(lr) * b(hp["weight_decay"]))
            p.sub_(step)
            return None
        base = p * (1 - b(lr) * b(hp["weight_decay"])) if decoupled else p
        return base - step
    return update


#: optimiser kind -> update(p, g, state, hp, lr, t, nesterov, flags, inplace) -> new p or None (in place);
#: the state dict is updated in place; hp and lr: (P,) tensors, or already (P, 1, ..., 1) views for p
UPDATES: dict[str, Callable[..., Tensor | None]] = {"sgd": _sgd, "adam": _adam_like(False), "adamw": _adam_like(True)}


class PopulationOptimizer:
    """PyTorch's SGD / Adam / AdamW on stacked (P, ...) parameters, with per-member hyperparameters.

    ``hp``: name -> (P,) tensor (``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``beta1``,
    ``beta2``, ``eps``); ``param_hp``: parameter name -> its own hyperparameters (a param group,
    e.g. embeddings with ``embed_lr``), else ``hp``. :meth:`step` takes each member's learning-rate
    factor (the schedule) and which members are still active (diverged members are frozen).
    """

    def __init__(self, kind: str, hp: dict[str, Tensor], nesterov: bool = False,
                 param_hp: dict[str, dict[str, Tensor]] | None = None):
        if kind not in UPDATES:
            raise ValueError(f"optimizer {kind!r} has no population update rule; known: {', '.join(UPDATES)}")
        self.kind, self.hp, self.nesterov = kind, hp, nesterov
        self.param_hp = param_hp or {}
        self.state: dict[str, dict[str, Tensor]] = {}
        self.t = 0
        self._flags: dict[int, _Flags] = {}
        self._views: dict[tuple[int, int], dict[str, Tensor]] = {}

    def _views_of(self, hp: dict[str, Tensor], ndim: int) -> dict[str, Tensor]:
        """``hp`` as (P, 1, ..., 1) views for ``ndim``-dimensional parameters, made once (not per step)."""
        key = (id(hp), ndim)
        if key not in self._views:
            self._views[key] = {k: v.reshape((-1,) + (1,) * (ndim - 1)) for k, v in hp.items()}
        return self._views[key]

    def _flags_of(self, hp: dict[str, Tensor]) -> _Flags:
        if id(hp) not in self._flags:
            self._flags[id(hp)] = _Flags(hp)
        return self._flags[id(hp)]

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], active: Tensor,
             lr_factor: Tensor | None = None, all_active: bool = False) -> None:
        """One update of every member; members not ``active`` (P,) keep their parameters (diverged runs are
        frozen). ``all_active``: the caller knows every member is active, so parameters update in place."""
        self.t += 1
        if all_active and self._sgd_foreach(params, grads, lr_factor):
            return
        update = UPDATES[self.kind]
        for name, p in params.items():
            hp = self.param_hp.get(name, self.hp)
            views = self._views_of(hp, p.dim())
            lr = views["lr"] if lr_factor is None else hp["lr"] * lr_factor
            new = update(p, grads[name], self.state.setdefault(name, {}), views, lr, self.t, self.nesterov,
                         self._flags_of(hp), all_active)
            if new is not None:
                p.copy_(torch.where(_b(active, p), new, p))

    def _sgd_foreach(self, params: dict[str, Tensor], grads: dict[str, Tensor], lr_factor: Tensor | None) -> bool:
        """:func:`_sgd` of every parameter at once, with ``torch._foreach_*`` operations (one call per operation
        for all parameter tensors, not one per tensor: ~4 x 6 fewer Python-level calls a step for a 3-layer MLP),
        where it applies: SGD, every member active (in place), one param group, no Nesterov, momentum 0 for
        all members or > 0 for all with a buffer already (every step but the first). The same operations on
        the same operands in the same order as :func:`_sgd` (IEEE products commute): the same bits. Returns
        False where it does not apply (the caller then runs :func:`_sgd` tensor by tensor)."""
        if self.kind != "sgd" or self.nesterov or any(n in self.param_hp for n in params):
            return False
        f = self._flags_of(self.hp)
        if not (f.no_momentum or (f.all_momentum and all("buf" in self.state.get(n, ()) for n in params))):
            return False
        ps, gs = list(params.values()), [grads[n] for n in params]
        views = [self._views_of(self.hp, p.dim()) for p in ps]
        d = gs if f.no_wd else torch._foreach_add(gs, torch._foreach_mul(ps, [v["weight_decay"] for v in views]))
        if f.no_momentum:
            upd = d
        else:
            upd = [self.state[n]["buf"] for n in params]
            torch._foreach_mul_(upd, [v["momentum"] for v in views])
            torch._foreach_add_(upd, d if f.no_dampening else
                                torch._foreach_mul(d, [1 - v["dampening"] for v in views]))
        lrs = [v["lr"] for v in views] if lr_factor is None else [_b(self.hp["lr"] * lr_factor, p) for p in ps]
        torch._foreach_sub_(ps, torch._foreach_mul(upd, lrs))
        return True

    def select(self, idx: Tensor) -> None:
        """Keep only the members ``idx`` (indices into the current members, on the device): every (P,)
        hyperparameter and every state slot is indexed in place of the old one (early stopping compacts a
        population to the members still training); param groups that shared one dict still share one."""
        groups: dict[int, dict[str, Tensor]] = {}

        def pick(hp: dict[str, Tensor]) -> dict[str, Tensor]:
            if id(hp) not in groups:
                groups[id(hp)] = {k: v.index_select(0, idx) for k, v in hp.items()}
            return groups[id(hp)]

        self.hp = pick(self.hp)
        self.param_hp = {name: pick(hp) for name, hp in self.param_hp.items()}
        self.state = {name: {slot: v.index_select(0, idx) for slot, v in st.items()} for name, st in self.state.items()}
        self._flags, self._views = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "state": self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t, self.state = sd["t"], sd["state"]


# ----------------------------------------------------------------------------- schedules
_KINDS = ("constant", "cosine", "linear", "step")


class Schedule:
    """Each member's learning-rate factor at optimiser step t (0-based: the t-th update).

    Equal to PyTorch's schedulers stepped once per optimiser step (``scheduler.step()`` after
    ``optimizer.step()``): a warm-up ``LinearLR(start_factor=1/(w+1), total_iters=w)`` for the
    first ``w = warmup_steps`` updates, then over the remaining ``T = steps - w`` updates
    (``SequentialLR`` with milestone ``w``):

    * ``constant``: 1;
    * ``cosine``: ``CosineAnnealingLR(T_max=T, eta_min=final_lr_factor x lr)``;
    * ``linear``: ``LinearLR(start_factor=1, end_factor=final_lr_factor, total_iters=T)``;
    * ``step``: ``StepLR(step_size=decay_every, gamma=decay_gamma)``.

    Per member: every setting is a (P,) tensor, so members of one population may differ.
    """

    def __init__(self, configs: list[dict[str, Any]], steps: int, dtype: torch.dtype, device: torch.device | str):
        def col(key: str, default: Any, cast=float) -> Tensor:
            vals = [cast(c.get(key) if c.get(key) is not None else default) for c in configs]
            return torch.tensor(vals, dtype=dtype if cast is float else torch.long, device=device)

        kinds = [c.get("schedule") or "constant" for c in configs]
        self.kind = torch.tensor([_KINDS.index(k) for k in kinds], device=device)
        self.warmup = col("warmup_steps", 0, float)
        self.final = col("final_lr_factor", 0.0)
        self.every = col("decay_every", 1, float)
        self.gamma = col("decay_gamma", 0.1)
        self.steps = float(steps)
        self.trivial = all(k == "constant" for k in kinds) and not bool((self.warmup > 0).any())

    def select(self, idx: Tensor) -> None:
        """Keep only the members ``idx`` (indices into the current members), as :meth:`PopulationOptimizer.select`."""
        for name in ("kind", "warmup", "final", "every", "gamma"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def factor(self, t: int) -> Tensor | None:
        """(P,) factors at step ``t``; None when every member trains at a constant rate."""
        if self.trivial:
            return None
        w = self.warmup
        warm = (t + 1) / (w + 1)
        s = torch.clamp(t - w, min=0.0)  # steps since the warm-up ended
        T = torch.clamp(self.steps - w, min=1.0)
        cosine = self.final + (1 - self.final) * (1 + torch.cos(math.pi * torch.clamp(s, max=T) / T)) / 2
        linear = 1 + (self.final - 1) * torch.clamp(s, max=T) / T
        step = self.gamma ** torch.floor(s / self.every)
        after = torch.where(self.kind == 1, cosine, torch.where(self.kind == 2, linear,
                                                                 torch.where(self.kind == 3, step, torch.ones_like(s))))
        return torch.where(t < w, warm, after)


# ----------------------------------------------------------------------------- clipping
def clip_coefficients(grads: dict[str, Tensor], max_norm: Tensor) -> tuple[Tensor, Tensor]:
    """``(total_norm (P,), coefficient (P,))`` of ``torch.nn.utils.clip_grad_norm_`` for each member:
    the L2 norm of the member's whole gradient (norm of the per-tensor norms, as torch computes it)
    and ``min(1, max_norm / (total_norm + 1e-6))``; ``max_norm`` inf means no clipping (coefficient 1)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads.values()], 1)
    total = torch.linalg.vector_norm(per_tensor, dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, coef
