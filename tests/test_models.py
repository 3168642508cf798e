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
