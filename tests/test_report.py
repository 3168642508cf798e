"""The HTML report: self-contained, loads in headless Chromium with no script errors, shows the phase map,
and its interactive curves view draws what ``raydyn curves`` computes (checked through the page's
``#selftest`` mode, which drives its own controls and writes what Plotly drew into ``<body data-selftest>``)."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raydyn.report import build_report
from raydyn.spec import parse_sweep, populations
from raydyn.store import open_store
from raydyn.train.population import train_population
from raydyn.train.recorder import runs_table

SWEEP = """
name: rep
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 20, batch_size: 16, lr: 0.05, record_every: 5}
parameters:
  lr: {values: [0.01, 0.1, 100.0]}
  width: {values: [4, 8]}
  seed: {values: [0, 1]}
"""

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
# virtual time lets the page's promises (Plotly's drawing, the self-test) settle before the DOM is dumped
VIRTUAL_TIME = "--virtual-time-budget=60000"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    store = open_store(root / "store")
    spec = parse_sweep(SWEEP)
    store.put_sweep("rep", SWEEP, {"hash": "x"})
    for pop in populations(spec.expand(), 64):
        res = train_population(pop)
        store.write_runs("rep", pop.pop_id, runs=runs_table(res, pop.pop_id), metrics=res.recorder.metrics_table(),
                         weights=res.recorder.weights_table())
    path = build_report(store, "rep", root / "rep.html", axes=spec.axes())
    return root, path


def page_data(path) -> dict:
    """The JSON the page embeds (``<script id="data">``)."""
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    return json.loads(m.group(1))


def decode(s: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype={"f4": "<f4", "f8": "<f8", "i4": "<i4", "u2": "<u2"}[dtype])


def embedded_values(data: dict, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run index, step, value) per embedded metrics row."""
    c = data["curves"]
    offsets = decode(c["offsets"], "i4")
    steps = np.asarray(c["steps"])[decode(c["step_index"], c["step_index_dtype"])]
    m = next(m for m in c["metrics"] if m["name"] == metric)
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), steps, decode(m["data"], m["dtype"])


def dump_dom(path, user_dir, hash_: str = "") -> tuple[str, dict[str, str]]:
    """The DOM Chromium ends with, and the attributes of its <body>."""
    dom = subprocess.run([CHROMIUM, *FLAGS, VIRTUAL_TIME, f"--user-data-dir={user_dir}", "--dump-dom",
                          path.as_uri() + hash_], capture_output=True, text=True, timeout=180)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-3000:]
    attrs = {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', body.group(0))}
    return dom.stdout, attrs


def test_report_is_self_contained(report):
    _, path = report
    text = path.read_text()
    assert "data:image/png;base64," in text
    # Plotly's bundle is inlined verbatim (its text holds URLs of map tile servers it never loads here);
    # outside it there is no external resource of any kind
    from plotly.offline import get_plotlyjs

    bundle = re.search(r'<script id="plotlyjs">(.*?)</script>', text, re.S)
    assert bundle and bundle.group(1) == get_plotlyjs()
    rest = text[:bundle.start()] + text[bundle.end():]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", rest)
    assert not re.search(r"<(script|link|iframe|img)[^>]*\s(src|href)=[\"']?(?![\"']|data:)", rest)
    # and the browser is told to load nothing: no network, no other file
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)
    assert csp and "default-src 'none'" in html.unescape(csp.group(1))
    assert "connect-src 'none'" in html.unescape(csp.group(1))
    assert text.count('<img class="plot"') == 1  # final_test_acc is NaN for regression: one map


def test_report_embeds_every_curve_and_the_choices(report):
    root, path = report
    data = page_data(path)
    store = open_store(root / "store")
    names = [m["name"] for m in data["curves"]["metrics"]]
    # numeric metrics columns with a finite value; accuracy is never logged for this regression task
    assert names[:4] == ["test_loss", "train_loss", "batch_loss", "grad_norm"] and "test_acc" not in names
    assert [g["column"] for g in data["groups"]] == ["lr", "width"]  # seed is not a group-by choice
    assert data["groups"][0]["values"] == ["0.01", "0.1", "100"]
    mt = store.table("metrics", sweep="rep")
    ids = [r[0] for r in data["rows"]]
    for metric in ("test_loss", "batch_loss"):
        run, step, value = embedded_values(data, metric)
        assert len(value) == mt.num_rows
        got = sorted(zip(np.asarray(ids)[run], step.tolist(), value.tolist()), key=lambda t: (t[0], t[1]))
        want = sorted(((r, s, float(np.float32(v)) if v is not None else float("nan")) for r, s, v in
                       zip(*(mt.column(c).to_pylist() for c in ("run_id", "step", metric)))), key=lambda t: (t[0], t[1]))
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_array_equal([g[2] for g in got], [w[2] for w in want])  # NaN where not recorded


@needs_chromium
def test_report_opens_in_headless_chromium(report, tmp_path):
    root, path = report
    dom, body = dump_dom(path, tmp_path / "u1")
    assert body.get("data-ready") == "1", body  # the page's script ran to the end, the plots are drawn
    assert "data-errors" not in body, body  # no script error
    assert body["data-rows"] == "12" and body["data-images"] == "1/1", body
    assert "<svg" in dom and 'class="main-svg"' in dom  # Plotly drew the curves
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, VIRTUAL_TIME, f"--user-data-dir={tmp_path / 'u2'}", "--window-size=1200,900",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    # the phase map (viridis cells, red diverged hatching) is on screen: many saturated pixels
    px = np.asarray(img).reshape(-1, 3).astype(int)
    colourful = int(((px.max(1) - px.min(1)) > 60).sum())
    assert colourful > 5000, colourful


@pytest.fixture(scope="module")
def selftest(report, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    root, path = report
    _, body = dump_dom(path, tmp_path_factory.mktemp("u"), "#selftest")
    return body, json.loads(body.get("data-selftest", "null"))


def test_selftest_runs_without_errors_or_loads(selftest):
    body, st = selftest
    assert body.get("data-ready") == "1" and body.get("data-selftest-done") == "1", body
    assert "data-errors" not in body and st["errors"] == [], st.get("errors")
    assert st["resources"] == []  # nothing fetched: every byte is in the file
    assert body["data-runs-with-curves"] == "12"


def _centre(traces):
    return [t for t in traces if t["role"] == "centre"]


def _finite_steps(root, metric: str, column: str) -> dict[str, set]:
    """Per group label: the steps where some run of the group has a finite value (what the page draws)."""
    from raydyn.plots.labels import fmt_value

    store = open_store(root / "store")
    runs = store.table("runs", sweep="rep").select(["run_id", column]) if column else None
    mt = store.table("metrics", sweep="rep").select(["run_id", "step", metric])
    mt = mt.filter(pc.is_finite(mt.column(metric)))
    if runs is None:
        return {"all runs": set(mt.column("step").to_pylist())}
    j = mt.join(runs, "run_id")
    out: dict[str, set] = {}
    for g, s in zip(j.column(column).to_pylist(), j.column("step").to_pylist()):
        out.setdefault(fmt_value(g), set()).add(s)
    return out


def test_group_by_selector_changes_the_drawn_lines(report, selftest):
    root, _ = report
    _, st = selftest
    assert st["metric"] == "test_loss"
    by = {o["value"]: o["traces"] for o in st["groupby"]}
    assert list(by) == ["", "lr", "width"]  # none, then the swept axes except seed
    names = {v: [t["name"] for t in _centre(tr)] for v, tr in by.items()}
    assert names == {"": ["all runs"], "lr": ["0.01", "0.1", "100"], "width": ["4", "8"]}
    for v, traces in by.items():
        assert [t["role"] for t in traces] == ["lo", "hi", "centre"] * len(names[v])  # band then line, per group
        expected = _finite_steps(root, "test_loss", v)
        assert {t["name"]: t["n"] for t in _centre(traces)} == {g: len(s) for g, s in expected.items()}
    # lr=100 diverges after step 1, the others are evaluated at steps 0 and 20: different lines
    assert {t["name"]: t["n"] for t in _centre(by["lr"])} == {"0.01": 2, "0.1": 2, "100": 2}
    f = st["facet"]
    assert f["group"] == "lr" and f["facet"] == "width"
    panels = {(t["facet"], t["xaxis"]) for t in f["traces"]}
    assert panels == {("4", "x"), ("8", "x2")}  # one panel per width
    assert sorted(t["name"] for t in f["traces"]) == sorted(["0.01", "0.1", "100"] * 2)


def test_page_median_and_bands_equal_numpy_and_curve_table(report, selftest):
    """The JS statistics over the embedded float32 values equal numpy's over the same values, and DuckDB's
    (curve_table, float64 values) to float32 precision."""
    from raydyn.aggregate.curves import curve_table
    from raydyn.plots.labels import fmt_value

    root, _ = report
    _, st = selftest
    store = open_store(root / "store")
    runs = store.table("runs", sweep="rep").select(["run_id", "lr"])
    mt = store.table("metrics", sweep="rep").select(["run_id", "step", "test_loss"]).join(runs, "run_id")
    lr, step = np.asarray(mt.column("lr")), np.asarray(mt.column("step"))
    v32 = np.asarray(mt.column("test_loss"), dtype=np.float64).astype(np.float32).astype(np.float64)
    checked = 0
    for rec in st["bands"]:
        band = rec["band"]
        table = curve_table(store, "rep", "test_loss", "lr", None, band).to_pydict()
        ref = {(fmt_value(g), s): i for i, (g, s) in enumerate(zip(table["group"], table["step"]))}
        traces = rec["traces"]
        assert [t["role"] for t in traces] == (["lo", "hi", "centre"] if band != "none" else ["centre"]) * 3
        for t in traces:
            g = float(t["name"])
            for x, y in zip(t["x"], t["y"]):
                vals = v32[(lr == g) & (step == x) & np.isfinite(v32)]
                mean, sd = vals.mean(), (vals.std(ddof=1) if vals.size > 1 else 0.0)
                want = {("centre", "std"): mean, ("lo", "std"): mean - sd, ("hi", "std"): mean + sd,
                        ("lo", "iqr"): np.quantile(vals, 0.25), ("hi", "iqr"): np.quantile(vals, 0.75),
                        ("lo", "minmax"): vals.min(), ("hi", "minmax"): vals.max()}.get((t["role"], band), np.median(vals))
                np.testing.assert_allclose(y, want, rtol=1e-12, err_msg=f"{band} {t['role']} lr={g} step={x}")
                i = ref[(t["name"], x)]
                col = {"lo": {"iqr": "q25", "minmax": "min"}, "hi": {"iqr": "q75", "minmax": "max"}}.get(t["role"], {})
                if band == "std":
                    m, s = table["mean"][i], table["std"][i] or 0.0
                    duck = {"centre": m, "lo": m - s, "hi": m + s}[t["role"]]
                else:
                    duck = table[col.get(band, "median")][i]
                np.testing.assert_allclose(y, duck, rtol=1e-6, err_msg=f"{band} {t['role']} lr={g} step={x}")
                checked += 1
            # the page draws exactly the steps where curve_table has a row for this group
            assert t["x"] == [s for (gg, s) in ref if gg == t["name"]]
    assert checked >= 3 * 2 * 7  # bands x traces x points


def test_overlay_shows_the_toggled_runs(report, selftest):
    _, path = report
    _, st = selftest
    data = page_data(path)
    ids = [r[0] for r in data["rows"]]
    first, second, untoggled = st["overlay"]
    assert [t["run_id"] for t in first["traces"]] == [ids[0]] and first["selected_rows"] == 1
    assert [t["run_id"] for t in second["traces"]] == [ids[0], ids[1]] and second["selected_rows"] == 2
    assert [t["run_id"] for t in untoggled["traces"]] == [ids[1]] and untoggled["selected_rows"] == 1
    assert second["traces"][0]["name"].startswith(ids[0] + " (lr=")  # legend says which run it is
    run, step, value = embedded_values(data, "test_loss")
    for t in second["traces"]:
        r = ids.index(t["run_id"])
        ok = (run == r) & np.isfinite(value) & (value > 0)  # log y is on for a loss
        assert t["x"] == step[ok].tolist() and t["y"] == value[ok].astype(float).tolist()


# ------------------------------------------------------------------ more than the old 500-run cap
LRS = [1e-3, 1e-2, 1e-1]


def synthetic_store(root, n_runs: int, n_steps: int, metrics: bool = True):
    """A store written directly (no training): lr x width x seed runs, test/train loss per step."""
    from raydyn.track import tracked_sweep_text

    store = open_store(root)
    store.put_sweep("big", tracked_sweep_text("big"), {"kind": "tracked", "method": "tracked"})
    rng = np.random.default_rng(0)
    i = np.arange(n_runs)
    lr = np.array(LRS)[i % 3]
    width = np.array([16, 32])[(i // 3) % 2]
    seeds = i // 6
    ids = [f"r{k:05d}" for k in i]
    store.write_part("runs", "big", "all", pa.table({
        "run_id": ids, "population": ids, "status": ["completed"] * n_runs, "seed": pa.array(seeds, pa.int64()),
        "steps_done": pa.array(np.full(n_runs, n_steps), pa.int64()), "wall_time_s": rng.uniform(1, 10, n_runs),
        "config_json": ["{}"] * n_runs, "weights_layout": ["{}"] * n_runs, "versions": ["{}"] * n_runs,
        "lr": lr, "width": pa.array(width, pa.int64())}))
    if not metrics:
        return store
    t = np.tile(np.arange(n_steps, dtype=np.int64) * 10, n_runs)
    r = np.repeat(i, n_steps)
    loss = np.exp(-lr[r] * t) * (1 + 64 / width[r]) + rng.normal(0, 0.02, t.size) ** 2
    loss[rng.random(t.size) < 0.01] = np.nan
    loss[rng.random(t.size) < 0.03] = np.inf  # non-finite values are skipped, per step
    train = loss * 0.9
    train[5] = 1e39  # out of float32's range: that metric is embedded as float64
    perm = rng.permutation(t.size)  # rows in no particular order
    store.write_part("metrics", "big", "m0", pa.table({
        "run_id": pa.array([ids[k] for k in r[perm]]), "step": pa.array(t[perm]), "test_loss": loss[perm],
        "train_loss": train[perm]}))
    return store


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    store = synthetic_store(root / "store", 600, 12)
    return store, build_report(store, "big", root / "big.html", axes=["lr", "width", "seed"])


def test_more_than_500_runs_are_all_embedded(big):
    store, path = big
    data = page_data(path)
    assert len(data["rows"]) == 600
    ids = np.asarray([r[0] for r in data["rows"]])
    mt = store.table("metrics", sweep="big")
    for metric, dtype in (("test_loss", "f4"), ("train_loss", "f8")):
        assert next(m for m in data["curves"]["metrics"] if m["name"] == metric)["dtype"] == dtype
        run, step, value = embedded_values(data, metric)
        assert len(np.unique(run)) == 600 and len(value) == 600 * 12
        order = np.lexsort((np.asarray(mt.column("step")), np.asarray(mt.column("run_id"))))
        np.testing.assert_array_equal(ids[run], np.asarray(mt.column("run_id"))[order])
        np.testing.assert_array_equal(step, np.asarray(mt.column("step"))[order])
        want = np.asarray(mt.column(metric))[order]
        np.testing.assert_array_equal(value, want.astype(value.dtype))
    assert 1e39 in embedded_values(data, "train_loss")[2]


@needs_chromium
def test_more_than_500_runs_in_chromium(big, tmp_path):
    store, path = big
    _, body = dump_dom(path, tmp_path / "u", "#selftest")
    st = json.loads(body["data-selftest"])
    assert "data-errors" not in body and st["errors"] == [], st.get("errors")
    assert body["data-runs-with-curves"] == "600" and body["data-rows"] == "600"
    by = {o["value"]: [t for t in o["traces"] if t["role"] == "centre"] for o in st["groupby"]}
    assert [t["name"] for t in by["lr"]] == ["0.001", "0.01", "0.1"] and all(t["n"] == 12 for t in by["lr"])
    assert [t["name"] for t in by["width"]] == ["16", "32"]
    # the median over all 600 runs at each step, from the embedded float32 values
    from raydyn.aggregate.curves import curve_table

    table = curve_table(store, "big", "test_loss", "lr", None, "iqr").to_pydict()
    iqr = next(b for b in st["bands"] if b["band"] == "iqr")["traces"]
    for role, col in (("centre", "median"), ("lo", "q25"), ("hi", "q75")):
        drawn = [t for t in iqr if t["role"] == role]
        np.testing.assert_allclose([y for t in drawn for y in t["y"]], table[col], rtol=1e-6, err_msg=role)


def test_report_without_metrics_says_so(tmp_path):
    store = synthetic_store(tmp_path / "store", 6, 2, metrics=False)
    assert store.table("metrics", sweep="big").num_rows == 0
    path = build_report(store, "big", tmp_path / "r.html", axes=["lr", "width", "seed"])
    data = page_data(path)
    assert data["curves"] is None and len(data["rows"]) == 6
    if CHROMIUM:
        dom, body = dump_dom(path, tmp_path / "u")
        assert body.get("data-ready") == "1" and "data-errors" not in body, body
        assert "No curves: the sweep has no metrics rows." in dom
