"""The population step's fast paths compute exactly what the plain ones do: the members' batches drawn
together (BatchRows), and the gradients by traced graph or plain autograd (PopulationFunctions._choose)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.func import stack_module_state

from raydyn.spec import parse_sweep, populations
from raydyn.tasks.build import init_model, load_data
from raydyn.train.population import BatchRows, BatchStream, PopulationFunctions


def _streams(n=23, b=5, seeds=range(4)):
    return [BatchStream(n, b, s) for s in seeds]


def test_batch_rows_draw_what_the_streams_draw_one_by_one():
    mine, ref, rows = _streams(), _streams(), BatchRows()
    for _ in range(30):  # several epochs (4 batches each, remainder dropped)
        got = rows.next(mine)
        want = torch.stack([s.next() for s in ref])
        assert torch.equal(got, want)
        for a, b in zip(mine, ref):  # the streams are left where one-by-one drawing leaves them
            assert a.pos == b.pos and torch.equal(a.perm, b.perm)
            assert torch.equal(a.gen.get_state(), b.gen.get_state())


def test_batch_rows_after_a_checkpoint_fewer_members_and_out_of_step_streams():
    mine, ref, rows = _streams(), _streams(), BatchRows()
    for _ in range(6):
        rows.next(mine), [s.next() for s in ref]
    # a checkpoint mid-epoch: permutations come back as new tensors
    states = [s.state() for s in mine]
    mine = _streams()
    for s, (pos, gen, perm) in zip(mine, states):
        s.load_state(pos, gen, perm)
    for _ in range(5):
        assert torch.equal(rows.next(mine), torch.stack([s.next() for s in ref]))
    # early stopping keeps some members only
    mine, ref = [mine[3], mine[1]], [ref[3], ref[1]]
    for _ in range(7):
        assert torch.equal(rows.next(mine), torch.stack([s.next() for s in ref]))
    # a stream out of step (drawn on its own) is drawn one by one: still the same batches
    mine[0].next(), ref[0].next()
    for _ in range(9):
        assert torch.equal(rows.next(mine), torch.stack([s.next() for s in ref]))


def test_batch_rows_full_batch():
    mine, ref = [BatchStream(7, 10, s) for s in (0, 1)], [BatchStream(7, 10, s) for s in (0, 1)]
    rows = BatchRows()
    for _ in range(3):
        assert torch.equal(rows.next(mine), torch.stack([s.next() for s in ref]))


SWEEP = """
name: t
task: {{dataset: digits, model: mlp, depth: 2, width: 32}}
train: {{steps: 5, batch_size: 32, optimizer: sgd, dtype: {dtype}}}
parameters:
  lr: {{values: [0.01, 0.05]}}
  seed: {{values: [0, 1, 2]}}
"""


def _population(model=None, dtype="float32"):
    pop = populations(parse_sweep(SWEEP.format(dtype=dtype)).expand(), 64)[0]
    data = load_data(pop.shared)
    models = [init_model(m.config, data) for m in pop.members] if model is None else [model(i) for i in range(6)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    fns = PopulationFunctions(base.train(), copy.deepcopy(base).eval(), "cross_entropy")
    streams = [BatchStream(data.n_train, 32, m.config["seed"]) for m in pop.members]
    return fns, params, buffers, data, streams


def _way(fn) -> str:
    return {"run": "traced", "_grad_autograd": "autograd"}.get(getattr(fn, "__name__", ""), "vmap")


def test_traced_gradients_equal_vmap_grad_bit_for_bit():
    """A built-in MLP takes the traced graph; its gradients and losses equal vmap(grad)'s over several steps."""
    for dtype in ("float32", "float64"):
        fns, params, buffers, data, streams = _population(dtype=dtype)
        rows = BatchRows()
        for _ in range(4):
            xb, yb = data.take("train", rows.next(streams))
            got, loss = fns.grad(params, buffers, xb, yb)
            want, want_loss = fns._grad_vmap(params, buffers, xb, yb)
            assert torch.equal(loss, want_loss)
            for k in want:
                assert torch.equal(got[k], want[k]) and got[k].stride() == want[k].stride(), k
            with torch.no_grad():
                for k in params:
                    params[k] -= 0.1 * got[k]
        assert [_way(f) for f in fns._fast.values()] == ["traced"]


def test_batch_norm_takes_the_traced_graph_and_updates_running_statistics_as_vmap_grad():
    def model(i):
        torch.manual_seed(i)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    fns, params, buffers, data, streams = _population(model)
    theirs = {k: v.clone() for k, v in buffers.items()}
    rows = BatchRows()
    for _ in range(3):
        xb, yb = data.take("train", rows.next(streams))
        got, loss = fns.grad(params, buffers, xb, yb)
        want, want_loss = fns._grad_vmap(params, theirs, xb, yb)
        assert torch.equal(loss, want_loss) and all(torch.equal(got[k], want[k]) for k in want)
        assert buffers.keys() == theirs.keys() and all(torch.equal(buffers[k], theirs[k]) for k in buffers)
    assert any(not torch.equal(buffers[k], v) for k, v in _population(model)[2].items() if v.is_floating_point())
    assert [_way(f) for f in fns._fast.values()] == ["traced"]


class _Counting(nn.Module):
    """A module of its own (not torch.nn / raydyn): keeps Python state a traced graph would freeze."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))

    def forward(self, x):
        return self.net(x)


def test_modules_of_their_own_are_not_traced():
    def model(i):
        torch.manual_seed(i)
        return _Counting()

    fns, params, buffers, data, streams = _population(model)
    assert not fns.traceable
    xb, yb = data.take("train", BatchRows().next(streams))
    got, _ = fns.grad(params, buffers, xb, yb)
    want, _ = fns._grad_vmap(params, buffers, xb, yb)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [_way(f) for f in fns._fast.values()] in (["autograd"], ["vmap"])


def test_a_way_that_rounds_differently_is_not_taken(monkeypatch):
    """When the fast ways' gradients differ from vmap(grad)'s in one bit, vmap(grad) is used."""
    fns, params, buffers, data, streams = _population()
    real_autograd, real_traced = PopulationFunctions._grad_autograd, PopulationFunctions._traced

    def off_by_one_ulp(g, loss):
        k = next(iter(g))
        g[k] = torch.nextafter(g[k], torch.full_like(g[k], np.inf))
        return g, loss

    def traced(self, *a):
        graph = real_traced(self, *a)

        def run(*b):
            return off_by_one_ulp(*graph(*b))
        return run

    monkeypatch.setattr(PopulationFunctions, "_grad_autograd", lambda self, *a: off_by_one_ulp(*real_autograd(self, *a)))
    monkeypatch.setattr(PopulationFunctions, "_traced", traced)
    xb, yb = data.take("train", BatchRows().next(streams))
    fns.grad(params, buffers, xb, yb)
    assert [_way(f) for f in fns._fast.values()] == ["vmap"]
