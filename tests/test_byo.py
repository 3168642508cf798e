"""Your own model and data: plug-ins by import path, trained as populations through a real Ray Tune sweep.

The plug-in module lives in a temporary folder outside the package, put on the driver's
``sys.path`` only (the workers find it through the folder the driver imported it from).
Every member's trajectory is compared with a bare PyTorch loop written here from scratch:
``torch.manual_seed(seed)``, ``factory(...)``, ``torch.optim``, the same data order.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import raydyn
from raydyn.errors import RaydynError, SpecError
from raydyn.spec import parse_sweep, populations
from raydyn.train.population import BatchStream, NotVectorisedWarning, train_population

PLUGIN = '''
"""Test plug-ins: models and a data set a user would write."""
import numpy as np
import torch
from torch import nn


def bn_cnn(input_shape, out_dim, width=4, depth=1, bn_eps=1e-5):
    """Conv -> ordinary BatchNorm2d (running statistics) -> ReLU, then pool and a linear read-out."""
    layers, c = [], input_shape[0]
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width, eps=bn_eps), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim))


def drop_mlp(input_shape, out_dim, width=16, p=0.5):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(width, out_dim))


class ItemMLP(nn.Module):
    """Reads a value back to Python in forward: vmap cannot trace it."""

    def __init__(self, d, out_dim, width):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.Tanh(), nn.Linear(width, out_dim))

    def forward(self, x):
        if float(x.abs().sum().item()) >= 0:  # always true; data-dependent Python control flow
            return self.net(x)
        return -self.net(x)


def item_mlp(input_shape, out_dim, width=8):
    return ItemMLP(int(np.prod(input_shape)), out_dim, width)


def frozen_mlp(input_shape, out_dim, width=8):
    """A fixed random first layer (requires_grad=False) and a trained read-out."""
    first = nn.Linear(int(np.prod(input_shape)), width)
    first.weight.requires_grad_(False)
    first.bias.requires_grad_(False)
    return nn.Sequential(nn.Flatten(), first, nn.Tanh(), nn.Linear(width, out_dim))


def not_a_module(input_shape, out_dim):
    return 42


def blobs(n_train=96, n_test=48, classes=3, seed=0):
    """Gaussian blobs as (1, 6, 6) images, integer labels."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, 1, 6, 6))
    def draw(n):
        y = g.integers(0, classes, n)
        return (centres[y] + 0.8 * g.normal(size=(n, 1, 6, 6))).astype(np.float32), y.astype(np.int64)
    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """A plug-in module `byo_plug` in a folder outside the package, importable on the driver."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "byo_plug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("byo_plug", None)
    from raydyn.tasks import registry

    registry.refresh()
    yield d
    sys.modules.pop("byo_plug", None)
    registry.refresh()


def sweep_text(name: str, model: str, *, steps: int = 12, extra_task: str = "", extra_train: str = "",
               params: str = "  lr: {values: [0.05, 0.2]}\n  seed: {values: [0, 1]}\n") -> str:
    return (f"name: {name}\n"
            f"task: {{dataset: 'byo_plug:blobs', model: '{model}'{extra_task}}}\n"
            f"train: {{steps: {steps}, batch_size: 16, optimizer: sgd, momentum: 0.9, record_every: 3, eval_every: 3,"
            f" dtype: float64{extra_train}}}\n"
            f"parameters:\n{params}")


def bare_loop(cfg: dict, factory, options: dict) -> dict[str, list[float]]:
    """A plain PyTorch loop, written independently of raydyn's trainer."""
    import byo_plug

    torch.set_default_dtype(torch.float64)
    try:
        xtr, ytr, xte, yte = (torch.as_tensor(a) for a in byo_plug.blobs())
        xtr, xte = xtr.double(), xte.double()
        torch.manual_seed(cfg["seed"])
        model = factory(input_shape=(1, 6, 6), out_dim=3, **options)
    finally:
        torch.set_default_dtype(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    order = BatchStream(len(xtr), cfg["batch_size"], cfg["seed"])  # the run's data order
    out = {"step": [], "train_loss": [], "test_loss": [], "test_acc": []}
    for step in range(cfg["steps"] + 1):
        idx = order.next()
        model.train()
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        if step % cfg["record_every"] == 0 or step == cfg["steps"]:
            model.eval()
            with torch.no_grad():
                out["step"].append(step)
                out["train_loss"].append(float(torch.nn.functional.cross_entropy(model(xtr), ytr)))
                o = model(xte)
                out["test_loss"].append(float(torch.nn.functional.cross_entropy(o, yte)))
                out["test_acc"].append(float((o.argmax(1) == yte).double().mean()))
        if step == cfg["steps"]:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def test_plugin_bn_model_and_dataset_through_a_ray_sweep(plugin, ray_session, tmp_path, monkeypatch):
    """A BatchNorm2d plug-in on a plug-in data set, trained by `run_sweep` on Ray: every member's train and
    test loss at every record equals the bare loop to 1e-6 (float64); store.model gives the recorded test loss."""
    monkeypatch.chdir(tmp_path)
    text = sweep_text("byo_bn", "byo_plug:bn_cnn", extra_task=", width: 4, model_options: {depth: 2}")
    sweep = raydyn.Sweep.from_text(text)
    summary = raydyn.run_sweep(sweep, store=str(tmp_path / "store"))
    assert summary.trained == 4 and summary.ok
    store = raydyn.open_store(str(tmp_path / "store"))
    runs = store.runs(sweep="byo_bn").to_pylist()
    assert len(runs) == 4 and {r["status"] for r in runs} == {"completed"}
    assert all(r["model_options_depth"] == 2 and r["width"] == 4 for r in runs)  # typed columns for phase maps
    metrics = store.metrics(sweep="byo_bn").to_pandas()
    import byo_plug

    for r in runs:
        cfg = json.loads(r["config_json"])
        ref = bare_loop(cfg, byo_plug.bn_cnn, {"width": 4, "depth": 2})
        m = metrics[metrics.run_id == r["run_id"]].sort_values("step")
        assert m.step.tolist() == ref["step"]
        for key in ("train_loss", "test_loss", "test_acc"):
            np.testing.assert_allclose(m[key].to_numpy(), ref[key], rtol=1e-6, atol=1e-9, err_msg=key)
        # the stored model (weights and running statistics of its last snapshot) gives the recorded test loss
        model = store.model(r["run_id"])
        data = store.data(r["run_id"])
        x, y = data.head("test")
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(x), y))
        assert loss == pytest.approx(m.test_loss.iloc[-1], rel=1e-6)
        mid = store.model(r["run_id"], step=6)
        with torch.no_grad():
            assert float(torch.nn.functional.cross_entropy(mid(x), y)) == pytest.approx(
                m[m.step == 6].test_loss.iloc[0], rel=1e-6)
    layout = json.loads(runs[0]["weights_layout"])
    assert layout["buffer_names"] == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"]


def test_dropout_members_draw_independent_masks(plugin):
    """Dropout: the eval-mode losses at initialisation equal the bare loop exactly (same init, no dropout in
    eval); training losses match the bare loop's in distribution over 12 seeds, and members differ."""
    from scipy import stats

    import byo_plug

    text = sweep_text("drop", "byo_plug:drop_mlp", steps=9, extra_task=", model_options: {p: 0.5}",
                      params="  seed: {values: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    res = train_population(pop)
    t = res.recorder.metrics_table().to_pandas()
    refs = {m.run_id: bare_loop(m.config, byo_plug.drop_mlp, {"p": 0.5}) for m in pop.members}
    first = t[t.step == 0].set_index("run_id")
    for rid, ref in refs.items():
        assert first.loc[rid, "test_loss"] == pytest.approx(ref["test_loss"][0], rel=1e-12)
    ours = t[t.step == 9].set_index("run_id").train_loss
    theirs = np.array([refs[rid]["train_loss"][-1] for rid in ours.index])
    assert not np.allclose(ours.to_numpy(), theirs, rtol=1e-6)  # the masks are not the bare loop's ...
    assert stats.ks_2samp(ours.to_numpy(), theirs).pvalue > 0.01  # ... but they are drawn alike
    # independence: two members with the same init and data order (same seed, lrs 1e-9 apart) see
    # different dropout masks on the same batch at step 0
    twin = sweep_text("twin", "byo_plug:drop_mlp", steps=1, extra_task=", model_options: {p: 0.5}",
                      params="  lr: {values: [0.1, 0.100000001]}\n  seed: {values: [0]}\n")
    (pop,) = populations(parse_sweep(twin).expand(), 64)
    t = train_population(pop).recorder.metrics_table().to_pandas()
    b0 = t[t.step == 0]
    assert b0.test_loss.nunique() == 1  # same weights (eval mode: no dropout)
    assert abs(b0.batch_loss.iloc[0] - b0.batch_loss.iloc[1]) > 1e-6  # different masks


def test_model_vmap_cannot_trace_is_trained_member_by_member(plugin):
    """`.item()` in forward: one warning, and the runs equal the bare loop (not a crash)."""
    import byo_plug

    text = sweep_text("item", "byo_plug:item_mlp", steps=6, extra_task=", width: 8")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    with pytest.warns(NotVectorisedWarning, match="cannot be vectorised") as got:
        res = train_population(pop)
    assert len([w for w in got if issubclass(w.category, NotVectorisedWarning)]) == 1
    t = res.recorder.metrics_table().to_pandas()
    for m in pop.members:
        ref = bare_loop(m.config, byo_plug.item_mlp, {"width": 8})
        np.testing.assert_allclose(t[t.run_id == m.run_id].sort_values("step").train_loss, ref["train_loss"], rtol=1e-9)
    assert all(r.extra["vectorised"] is False for r in res.members)


@pytest.mark.parametrize("model,match", [
    ("no_such_module:f", "module 'no_such_module' not found"),
    ("byo_plug:missing", "has no attribute 'missing'"),
    ("byo_plug:np", "not a callable"),
    ("byo_plug", "unknown model 'byo_plug'"),
    ("not an import path:x", "not an import path"),
])
def test_bad_plugin_paths_are_named(plugin, model, match):
    with pytest.raises(SpecError, match=match) as e:
        parse_sweep(sweep_text("bad", model), "bad.yaml")
    assert "task.model" in str(e.value)


def test_plugin_options_are_checked_against_the_factory(plugin):
    with pytest.raises(SpecError, match=r"model_options.colour: plug-in model 'byo_plug:bn_cnn' takes no argument "
                                        r"'colour'; its factory's arguments: width, depth, bn_eps"):
        parse_sweep(sweep_text("x", "byo_plug:bn_cnn", extra_task=", model_options: {colour: red}"), "x.yaml")
    with pytest.raises(SpecError, match="batch_norm: an option of raydyn's built-in models"):
        parse_sweep(sweep_text("x", "byo_plug:bn_cnn", extra_task=", batch_norm: true"), "x.yaml")
    spec = parse_sweep(sweep_text("x", "byo_plug:bn_cnn", params="  model_options.depth: {values: [1, 2]}\n"))
    assert sorted(r["model_options"]["depth"] for r in spec.expand()) == [1, 2]
    with pytest.raises(SpecError, match="parameters.model_options.nope: unknown parameter"):
        parse_sweep(sweep_text("x", "byo_plug:bn_cnn", params="  model_options.nope: {values: [1]}\n"), "x.yaml")


def test_plugin_returning_no_module_fails_before_anything_launches(plugin, tmp_path, monkeypatch):
    """The driver builds one model per architecture before starting Ray: one clear error, nothing written."""
    monkeypatch.chdir(tmp_path)
    sweep = raydyn.Sweep.from_text(sweep_text("nomod", "byo_plug:not_a_module"))
    with pytest.raises(RaydynError, match=r"task.model 'byo_plug:not_a_module' returned a int, not a torch.nn.Module"):
        raydyn.run_sweep(sweep, store=str(tmp_path / "s"))
    assert not (tmp_path / "s" / "runs").exists()


def test_entry_point_names_a_model(tmp_path, monkeypatch):
    """A lab's package registers `lab_bn` under the raydyn.models entry-point group."""
    site = tmp_path / "site"
    (site / "lab_models").mkdir(parents=True)
    (site / "lab_models" / "__init__.py").write_text(PLUGIN)
    dist = site / "lab_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[raydyn.models]\nlab_bn = lab_models:bn_cnn\n"
                                           "[raydyn.datasets]\nlab_blobs = lab_models:blobs\n")
    monkeypatch.syspath_prepend(str(site))
    from raydyn.tasks import registry

    registry.refresh()
    try:
        assert "lab_bn" in registry.model_names() and "lab_blobs" in registry.dataset_names()
        spec = parse_sweep("name: ep\ntask: {dataset: lab_blobs, model: lab_bn, width: 3}\ntrain: {steps: 2}\n")
        (pop,) = populations(spec.expand(), 8)
        res = train_population(pop)
        assert res.members[0].status == "completed"
        assert [n for n in res.recorder.layout["names"]][:2] == ["0.weight", "0.bias"]
    finally:
        registry.refresh()


def test_store_written_before_the_registry_still_resumes(ray_session, tmp_path):
    """The fixture store was written by raydyn before this change: a re-run trains nothing."""
    src = Path(__file__).parent / "fixtures"
    shutil.copytree(src / "pre_registry_store", tmp_path / "store")
    summary = raydyn.run_sweep(src / "pre_registry_sweep.yaml", store=str(tmp_path / "store"))
    assert (summary.total, summary.skipped, summary.trained) == (4, 4, 0)


def test_every_shipped_sweep_keeps_its_run_and_population_ids():
    from raydyn.spec import load_sweep

    fixture = json.loads((Path(__file__).parent / "fixtures" / "run_ids_pre_registry.json").read_text())
    for name, want in fixture.items():
        spec = parse_sweep(want["text"], name)
        runs = spec.expand()
        assert sorted(r.run_id for r in runs) == want["runs"], name
        assert sorted(p.pop_id for p in populations(runs, spec.resources.population_size)) == want["populations"], name
    assert load_sweep  # (the shipped files themselves may change; their texts at the change are in the fixture)


def test_gpu_reserved_but_unused_warns():
    from raydyn.sweep import gpu_warning

    spec = parse_sweep("name: g\ntask: {dataset: digits}\ntrain: {steps: 2, device: cpu}\nresources: {gpu: 1}\n")
    assert "will not use it" in gpu_warning(spec)
    assert gpu_warning(parse_sweep("name: g\ntask: {dataset: digits}\ntrain: {steps: 2}\nresources: {gpu: 1}\n")) is None


def test_device_is_not_part_of_run_ids_and_cannot_be_swept():
    a = parse_sweep("name: d\ntask: {dataset: digits}\ntrain: {steps: 2, device: cpu}\n").expand()
    b = parse_sweep("name: d\ntask: {dataset: digits}\ntrain: {steps: 2, device: cuda}\n").expand()
    assert [r.run_id for r in a] == [r.run_id for r in b] and "device" not in a[0].config
    with pytest.raises(SpecError, match="parameters.device"):
        parse_sweep("name: d\ntask: {dataset: digits}\ntrain: {steps: 2}\nparameters: {device: {values: [cpu]}}\n",
                    "d.yaml")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has none)")
def test_cuda_population_equals_cpu():
    """On a GPU: the same population trained on cuda and on cpu agrees to float64 rounding."""
    text = ("name: gpu\ntask: {dataset: digits, model: cnn, depth: 2, width: 8, batch_norm: true}\n"
            "train: {steps: 20, batch_size: 32, dtype: float64, record_every: 5}\nparameters: {seed: {values: [0, 1]}}\n")
    (pop,) = populations(parse_sweep(text).expand(), 8)
    cpu = train_population(pop, device="cpu").recorder.metrics_table().to_pandas()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu = train_population(pop, device="cuda").recorder.metrics_table().to_pandas()
    np.testing.assert_allclose(gpu.train_loss, cpu.train_loss, rtol=1e-9, equal_nan=True)


def test_checkpoint_resume_is_bit_for_bit_with_running_stats_and_dropout(plugin, tmp_path):
    """Buffers (running statistics) and the RNG state (dropout masks) travel with checkpoints."""
    from raydyn.train.checkpoint import PopulationCheckpoint

    text = sweep_text("ck", "byo_plug:bn_cnn", steps=12, extra_task=", width: 3")
    for model, extra in (("byo_plug:bn_cnn", ", width: 3"), ("byo_plug:drop_mlp", ", model_options: {p: 0.3}")):
        text = sweep_text("ck", model, steps=12, extra_task=extra)
        (pop,) = populations(parse_sweep(text).expand(), 64)
        straight = train_population(pop)
        saved = []
        train_population(pop, checkpoint_every=5, on_checkpoint=lambda c: (c.save(tmp_path / f"{len(saved)}"),
                                                                             saved.append(tmp_path / f"{len(saved)}")))
        resumed = train_population(pop, resume=PopulationCheckpoint.load(saved[-1]))
        a, b = straight.recorder.metrics_table(), resumed.recorder.metrics_table()
        assert a.equals(b), model
        assert straight.recorder.weights_table().equals(resumed.recorder.weights_table()), model


def test_running_stats_are_snapshotted_beside_weights_written_in_place(plugin, monkeypatch):
    """The CPU path that writes parameters straight into the snapshot rows (Recorder._direct_slot) still
    records the running statistics, and both tables equal the copying path's bit for bit."""
    from raydyn.train.recorder import Recorder

    (pop,) = populations(parse_sweep(sweep_text("rs", "byo_plug:bn_cnn", steps=8, extra_task=", width: 3")).expand(), 64)
    direct = train_population(pop).recorder.weights_table()
    monkeypatch.setattr(Recorder, "_direct_slot", lambda self, mask, params: None)
    copied = train_population(pop).recorder.weights_table()
    assert "buffers" in direct.column_names and direct.num_rows > 0
    assert direct.equals(copied)


def test_bf16_autocast_trains_close_to_float32(plugin):
    text = sweep_text("bf", "byo_plug:bn_cnn", steps=6, extra_task=", width: 4").replace("dtype: float64", "dtype: float32")
    def losses(t):
        (pop,) = populations(parse_sweep(t).expand(), 64)
        m = train_population(pop).recorder.metrics_table().to_pandas()
        key = {r.run_id: (r.config["seed"], r.config["lr"]) for r in pop.members}
        m["key"] = m.run_id.map(key)
        return m.sort_values(["key", "step"])

    full = losses(text)
    with warnings.catch_warnings():  # torch 2.13's vmap of batch norm under CPU autocast: trained one by one
        warnings.simplefilter("ignore", NotVectorisedWarning)
        half = losses(text.replace("dtype: float32", "dtype: float32, precision: bf16"))
    np.testing.assert_allclose(half.train_loss, full.train_loss, rtol=0.05)  # bfloat16 has 8 bits of mantissa
    assert not np.allclose(half.train_loss, full.train_loss, rtol=1e-6)  # and it did compute in bfloat16


def test_examples_vgg_on_an_image_folder_keeps_the_exact_scale_law(tmp_path, monkeypatch):
    """The README's byo path end to end, small: examples/make_digits_images.py writes an image folder,
    the example VGG plug-in (ordinary BatchNorm2d) trains on it in float64 with bn_eps 1e-300, and the
    exact scale law of every BN-preceded conv channel holds to 1e-6 (Kunin et al. 2021)."""
    import subprocess

    from raydyn.analysis.symmetry import predict, relative_error

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("RAYDYN_CACHE_DIR", str(tmp_path / "cache"))
    subprocess.run([sys.executable, str(repo / "examples" / "make_digits_images.py"), "--out", str(tmp_path / "png"),
                    "--size", "8"], check=True, capture_output=True)
    monkeypatch.chdir(repo)  # examples.byo_models imports from the repo root, as in sweeps/byo_cnn.yaml
    text = (f"name: v\ntask: {{model: 'examples.byo_models:vgg', dataset: image_folder, "
            f"data: {{root: '{tmp_path / 'png'}', size: 8}}, depth: 2, width: 4, model_options: {{bn_eps: 1.0e-300}}}}\n"
            "train: {steps: 15, batch_size: 32, momentum: 0.9, weight_decay: 5.0e-4, dtype: float64, record: [symmetry]}\n"
            "parameters: {lr: {values: [0.05, 0.2]}}\n")
    (pop,) = populations(parse_sweep(text).expand(), 8)
    res = train_population(pop)
    t = res.recorder.extra_tables()
    steps, groups = t["symmetry_steps"].to_pylist(), t["symmetry_groups"].to_pylist()
    scale = [g for g in groups if g["kind"] == "scale"]
    assert sorted({g["layer"] for g in scale}) == ["0", "4"]  # both convs (each feeds its BatchNorm2d)
    for g in scale:
        rows = sorted((r for r in steps if (r["run_id"], r["kind"], r["layer"]) == (g["run_id"], "scale", g["layer"])),
                      key=lambda r: r["step"])
        q, d = np.array([r["q"] for r in rows]), np.array([r["drive"] for r in rows])
        assert q.shape == (16, 4)  # every step, every channel
        pred = predict("scale", q[0], len(q) - 1, g["lr"], g["weight_decay"], g["momentum"], sq_norms=d[:-1],
                       method="exact", dampening=g["dampening"])
        assert float(np.max(relative_error(pred, q))) < 1e-6


def test_frozen_parameters_stay_fixed_and_load_back(plugin):
    """requires_grad=False parameters are constants: not trained, not in the weight snapshots, kept with the
    buffers, and a stored snapshot loads back into the rebuilt model with the recorded test loss."""
    from raydyn.tasks.build import check_param_order, init_model, load_snapshot

    text = sweep_text("fz", "byo_plug:frozen_mlp", steps=6, extra_task=", width: 5")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    res = train_population(pop)
    layout = res.recorder.layout
    assert layout["names"] == ["3.weight", "3.bias"] and layout["buffer_names"] == ["1.weight", "1.bias"]
    w = res.recorder.weights_table().to_pandas()
    t = res.recorder.metrics_table().to_pandas()
    m = pop.members[0]
    model = init_model(m.config, res.recorder.context["data"])
    first0 = model[1].weight.detach().clone()
    check_param_order(model, layout)
    last = w[w.run_id == m.run_id].sort_values("step").iloc[-1]
    load_snapshot(model, layout, last.weights, last.buffers).eval()
    # never trained (snapshots are float32: equal to float32 rounding)
    torch.testing.assert_close(model[1].weight, first0, rtol=1e-6, atol=1e-7)
    x, y = res.recorder.context["data"].head("test")
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
    assert loss == pytest.approx(t[(t.run_id == m.run_id) & (t.step == 6)].test_loss.iloc[0], rel=1e-5)
