"""Model shortcuts that must not change the function computed."""
from __future__ import annotations

import pytest
import torch

from raydyn.tasks.models import Transformer


@pytest.mark.parametrize("depth", [1, 2])
def test_transformer_last_position_shortcut_is_the_full_computation(depth):
    """The last block computes only the last position; logits and gradients equal running every position."""
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            model = Transformer(vocab=12, seq_len=3, out_dim=11, depth=depth, width=16, heads=4, activation="relu",
                                bias=True)
        finally:
            torch.set_default_dtype(torch.float32)
    tokens = torch.randint(0, 12, (40, 3))

    def full(m):
        x = m.embed(tokens) + m.pos
        for block in m.blocks:
            x = block(x)  # every position
        return m.unembed(x[:, -1])

    fast, slow = model(tokens), full(model)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    g_slow = torch.autograd.grad(full(model).square().sum(), list(model.parameters()))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nanda_initialisation_scales():
    """init: nanda -- matrices N(0, 1/d_model), unembedding N(0, 1/vocab), biases 0; seeded like any init."""
    from raydyn.tasks.registry import build_model

    cfg = {"model": "transformer", "depth": 1, "width": 128, "heads": 4, "activation": "relu", "bias": True,
           "init": "nanda"}
    torch.manual_seed(3)
    m = build_model(cfg, (3,), 113, vocab=114)
    params = dict(m.named_parameters())
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            want = 1 / 114**0.5 if name.startswith("unembed") else 1 / 128**0.5
            sd = float(p.detach().std())
            assert abs(sd / want - 1) < 4 / (2 * p.numel()) ** 0.5, (name, sd, want)  # 4 standard errors
    torch.manual_seed(3)
    again = build_model(cfg, (3,), 113, vocab=114)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))
    torch.manual_seed(3)
    default = build_model({**cfg, "init": "torch"}, (3,), 113, vocab=114)
    assert float(default.embed.weight.detach().std()) > 0.9  # PyTorch's Embedding is N(0, 1): 11x larger


def test_nanda_initialisation_is_refused_for_other_models():
    from raydyn.errors import SpecError
    from raydyn.spec import parse_sweep

    with pytest.raises(SpecError, match="init: 'nanda' is the transformer initialisation"):
        parse_sweep("name: x\ntask: {dataset: digits, model: mlp, init: nanda}\ntrain: {steps: 5}\n")
