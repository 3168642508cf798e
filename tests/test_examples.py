"""The examples: the digits image folder writer and the plug-in models (examples/byo_models.py).

The models are checked the way raydyn trains them: a population of 3 stacked with
``torch.func.stack_module_state`` and stepped with ``vmap(grad_and_value(...))``, per-member
buffers; each member must match that model trained alone (loss, gradients, BatchNorm running
statistics).
"""
from __future__ import annotations

import collections
import copy
import hashlib
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from raydyn.analysis.symmetry import find_groups
from raydyn.tasks import disk

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Decoded images go to a temporary cache, not ~/.cache/raydyn."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYDYN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import byo_models
        import make_digits_images

        yield make_digits_images, byo_models
    finally:
        sys.path.remove(str(EXAMPLES))
        for name in ("byo_models", "make_digits_images"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def digits16(examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits_png"
    examples[0].main(["--out", str(out), "--size", "16"])
    return out


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_make_digits_images(examples, digits16, tmp_path, capsys):
    from sklearn.datasets import load_digits

    target = load_digits().target
    files = {s: sorted((digits16 / s).rglob("*.png")) for s in ("train", "test")}
    assert (len(files["train"]), len(files["test"])) == (1437, 360)
    assert sorted(p.name for p in (digits16 / "train").iterdir()) == [str(i) for i in range(10)]
    for split in files:  # every file sits in its digit's folder; the split is stratified and disjoint
        for p in files[split]:
            assert target[int(p.stem)] == int(p.parent.name)
    idx = {s: {int(p.stem) for p in files[s]} for s in files}
    assert not idx["train"] & idx["test"] and len(idx["train"] | idx["test"]) == 1797
    test_counts = collections.Counter(int(p.parent.name) for p in files["test"])
    assert all(abs(test_counts[c] - 0.2 * (target == c).sum()) <= 1 for c in range(10))
    with Image.open(files["train"][0]) as im:
        assert (im.mode, im.size) == ("L", (16, 16))
    # deterministic: the same bytes on a second run
    again = tmp_path / "again"
    examples[0].main(["--out", str(again), "--size", "16"])
    assert "wrote 1437 train and 360 test images" in capsys.readouterr().out
    assert _tree_digest(again) == _tree_digest(digits16)
    d = disk.load_image_folder(digits16, size=16)
    assert (d.kind, d.out_dim, d.input_shape) == ("classification", 10, (1, 16, 16))


def _population(factory, n=3, **options):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(factory(input_shape=(1, 16, 16), out_dim=10, **options))
    return models


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_population_step_matches_members_alone(examples, digits16, name):
    byo = examples[1]
    data = disk.load_image_folder(digits16, size=16)
    models = _population(getattr(byo, name), depth=2, width=6)
    alone = [copy.deepcopy(m) for m in models]
    params, buffers = stack_module_state(models)  # name -> (P, ...)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    idx = torch.stack([torch.arange(16) + 16 * i for i in range(3)])  # each member its own batch
    xb, yb = data.x_train[idx], data.y_train[idx]
    grads, losses = vmap(grad_and_value(loss), in_dims=(0, 0, 0, 0))(params, buffers, xb, yb)
    lr = 0.1
    params = {k: v - lr * grads[k] for k, v in params.items()}
    assert any("running_mean" in k for k in buffers)
    for i, m in enumerate(alone):
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        li = torch.nn.functional.cross_entropy(m(xb[i]), yb[i])
        li.backward()
        opt.step()
        assert float(losses[i]) == pytest.approx(float(li.detach()), rel=1e-5, abs=1e-6)
        for k, v in m.named_buffers():  # running mean/var and num_batches_tracked: this member's own
            assert torch.allclose(buffers[k][i], v, rtol=1e-5, atol=1e-6), (i, k)
            assert not torch.equal(buffers[k][i], buffers[k][(i + 1) % 3]) or "num_batches" in k, (i, k)
        for k, v in m.named_parameters():
            assert torch.allclose(params[k][i], v, rtol=1e-4, atol=1e-6), (i, k)
    nbt = [k for k in buffers if k.endswith("num_batches_tracked")]
    assert nbt and all(int(buffers[k][i]) == 1 for k in nbt for i in range(3))


def test_model_contract_and_symmetries(examples):
    byo = examples[1]
    for shape in [(1, 8, 8), (3, 5, 7), (3, 32, 32)]:  # pooling stops at 1x1; odd sizes; RGB
        x = torch.rand(2, *shape)
        for factory in (byo.vgg, byo.resnet):
            torch.manual_seed(0)
            m = factory(input_shape=shape, out_dim=7, depth=4, width=4)
            torch.manual_seed(0)
            m2 = factory(input_shape=shape, out_dim=7, depth=4, width=4)
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
            assert m(x).shape == (2, 7)
    for act in byo.ACTIVATIONS:
        assert byo.vgg(input_shape=(1, 8, 8), out_dim=3, activation=act)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        byo.vgg(input_shape=(1, 8, 8), out_dim=3, activation="swish")
    with pytest.raises(ValueError, match=r"needs image inputs \(C, H, W\), got input_shape=\(64,\)"):
        byo.resnet(input_shape=(64,), out_dim=3)
    assert byo.vgg(input_shape=(1, 8, 8), out_dim=3, bn_eps=1e-3)[1].eps == 1e-3

    def kinds(model):
        return collections.Counter((g.kind, g.layer) for g in find_groups(model))

    v = kinds(byo.vgg(input_shape=(1, 16, 16), out_dim=10, depth=2, width=8))
    assert {k for k in v if k[0] == "scale"} == {("scale", "0"), ("scale", "4")}  # every conv feeds its BN
    assert v[("scale", "0")] == 8 and v[("rescale", "1")] == 8 and v[("rescale", "5")] == 8
    r = kinds(byo.resnet(input_shape=(1, 16, 16), out_dim=10, depth=2, width=8))
    convs = {"stem.0", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2"}
    assert {k[1] for k in r if k[0] == "scale"} == convs
    # rescale only inside a block (bn1 -> relu -> conv2), never across a skip connection
    assert {k[1] for k in r if k[0] == "rescale"} == {"blocks.0.bn1", "blocks.1.bn1"}
