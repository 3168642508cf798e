"""The built-in models. Every model honours ``depth`` and ``width`` so phase maps over them mean something.

They are registered (with their options, checks and the data sets they fit) in
:mod:`raydyn.tasks.registry`, next to plug-in models. The built-ins have no running-statistics
buffers: their batch norm normalises with the statistics of the batch it sees, in training and
evaluation alike (``track_running_stats=False``). Plug-in models may use ordinary batch norm
(running statistics are then kept per population member, and evaluation uses them).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "linear": nn.Identity,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


class OneHot(nn.Module):
    """Token ids (B, S) -> concatenated one-hot vectors (B, S * vocab), for MLPs on token tasks."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(self.vocab, device=tokens.device)
        return (tokens.unsqueeze(-1) == ids).to(torch.get_default_dtype()).flatten(-2)


def mlp(in_features: int, out_dim: int, depth: int, width: int, activation: str, batch_norm: bool, bias: bool,
        bn_eps: float = 1e-5) -> nn.Module:
    """Flatten -> depth x [Linear(width) (-> BatchNorm1d) -> act] -> Linear(out_dim)."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(depth):
        layers.append(nn.Linear(d, width, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width, eps=bn_eps, track_running_stats=False))
        layers.append(ACTIVATIONS[activation]())
        d = width
    layers.append(nn.Linear(d, out_dim, bias=bias))
    return nn.Sequential(*layers)


def cnn(in_shape: tuple[int, ...], out_dim: int, depth: int, width: int, activation: str, batch_norm: bool, bias: bool,
        bn_eps: float = 1e-5) -> nn.Module:
    """depth x [Conv3x3(width) (-> BatchNorm2d) -> act] -> global average pool -> Linear(out_dim)."""
    layers: list[nn.Module] = []
    c = in_shape[0]
    for _ in range(depth):
        layers.append(nn.Conv2d(c, width, 3, padding=1, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width, eps=bn_eps, track_running_stats=False))
        layers.append(ACTIVATIONS[activation]())
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim, bias=bias)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Causal multi-head self-attention written out so it vmaps cleanly."""

    def __init__(self, d_model: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: (B, S, d) -> (B, S, d), or (B, 1, d) for the last position only (``last_only``)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        shape = (b, s, self.heads, d // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, S, dh)
        if last_only:  # the last query attends to every position: no mask
            q = q[:, :, -1:]
        att = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, S_q, S)
        if not last_only:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, q.shape[2], d))


class Block(nn.Module):
    """Residual attention + residual MLP (4 x d_model), no layer norm (as in Nanda et al. 2023)."""

    def __init__(self, d_model: int, heads: int, activation: str, bias: bool):
        super().__init__()
        self.attn = Attention(d_model, heads, bias)
        self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.mlp_out = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, S, d) -> (B, S, d); with ``last_only`` (B, 1, d): only the last position's output."""
        x = (x[:, -1:] if last_only else x) + self.attn(x, last_only)
        return x + self.mlp_out(self.act(self.mlp_in(x)))


class Transformer(nn.Module):
    """1-2 layer decoder-only transformer reading token sequences; logits at the last position."""

    def __init__(self, vocab: int, seq_len: int, out_dim: int, depth: int, width: int, heads: int, activation: str, bias: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) / math.sqrt(width))
        self.blocks = nn.Sequential(*[Block(width, heads, activation, bias) for _ in range(depth)])
        self.unembed = nn.Linear(width, out_dim, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, S) int64
        x = self.embed(tokens) + self.pos
        # The logits read the last position only, so the last block computes only that position
        # (its other positions feed nothing): the same function at a third of the last MLP's cost.
        *body, last = self.blocks
        for block in body:
            x = block(x)
        return self.unembed(last(x, last_only=True)[:, -1])


class UV(nn.Module):
    """The two-layer linear "uv" model of Lewkowycz et al. (2020): f(x) = v . (u x) / sqrt(m).

    Scalar input and output; ``u, v`` (m,) drawn N(0, 1). Its NTK on x = 1 is exactly
    (|u|^2 + |v|^2) / m.
    """

    def __init__(self, width: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(width))
        self.v = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1) -> (B, 1)
        # elementwise product + sum: ~20x faster under vmap than a (B, m) @ (m, 1) matmul on CPU
        return x * (self.u * self.v).sum() / math.sqrt(self.u.shape[0])


class ToyGrok(nn.Module):
    """The toy model of Liu et al. (2022): learned 1-D embeddings, exact addition, MLP decoder.

    Each symbol has a learned scalar embedding E_a (initialised U(-1/2, 1/2)); a pair
    (a, b) is decoded from E_a + E_b by ``depth`` tanh layers of ``width`` units and a
    linear read-out (``out_dim`` logits). The embedding is the parameter ``embed`` (so
    ``train.embed_lr``/``embed_weight_decay`` apply to it); everything else is the decoder.
    """

    def __init__(self, vocab: int, out_dim: int, depth: int, width: int, activation: str, bias: bool):
        super().__init__()
        self.embed = nn.Parameter(torch.rand(vocab, 1) - 0.5)
        layers: list[nn.Module] = []
        d = 1
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=bias), ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, out_dim, bias=bias))
        self.decoder = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, 2) int64 -> (B, out_dim)
        return self.decoder(self.embed[tokens].sum(dim=-2))


@torch.no_grad()
def nanda_init(model: "Transformer") -> None:
    """Nanda et al. (2023)'s initialisation of the grokking transformer, in place: every matrix
    (embedding, positions, attention, MLP) N(0, 1/d_model), the unembedding N(0, 1/vocab) with
    vocab = the embedding's size, every bias 0. Draws from the global RNG (seeded by the caller)."""
    if not isinstance(model, Transformer):
        raise ValueError(f"init 'nanda' is for the transformer, not {type(model).__name__}")
    d = model.embed.embedding_dim
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif name.startswith("unembed"):
            p.normal_(0.0, 1.0 / math.sqrt(model.embed.num_embeddings))
        else:
            p.normal_(0.0, 1.0 / math.sqrt(d))


def post_init(m: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """raydyn's initialisation options, applied to any freshly built model (built-in or plug-in), in place.

    ``init: nanda`` (transformer), then every parameter multiplied by ``init_scale`` and by
    ``fixed_norm`` when that is set (constrained training starts from alpha x the initial weights),
    then nearby initialisations ``x (1 + init_perturb U(-1, 1))`` from a generator of their own
    seeded by (seed, perturb), so the global RNG stream is untouched.
    """
    if cfg.get("init", "torch") == "nanda":
        nanda_init(m)
    scale = float(cfg.get("init_scale", 1.0)) * float(cfg.get("fixed_norm") or 1.0)
    if scale != 1.0:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
    eps = float(cfg.get("init_perturb", 0.0) or 0.0)
    if eps > 0:  # nearby initialisations (Redman et al. 2024): x (1 + eps U(-1, 1)), own generator
        g = torch.Generator().manual_seed(int(cfg.get("seed", 0)) * 100_003 + int(cfg.get("perturb", 0)) + 1)
        with torch.no_grad():
            for p in m.parameters():
                u = torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 2 - 1
                p.mul_(1 + eps * u)
    return m
