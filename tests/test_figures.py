"""Paper-ready figures: phase-map options (labels, captions, colour scale, spread, formats) and
`raydyn curves` (per-group curves over steps aggregated in DuckDB), without Ray."""
from __future__ import annotations

import json
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import raydyn  # noqa: E402
from raydyn.cli import app  # noqa: E402
from raydyn.errors import RaydynError  # noqa: E402
from raydyn.aggregate.curves import curve_table  # noqa: E402
from raydyn.aggregate.maps import phase_map_info  # noqa: E402
from raydyn.plots.maps import colorbar_caption, draw_phase_map, render_phase_map  # noqa: E402
from raydyn.plots.curves import render_curves  # noqa: E402
from raydyn.plots.labels import readable  # noqa: E402
from raydyn.store import open_store  # noqa: E402

LRS, WIDTHS, SEEDS, STEPS = [0.01, 0.1, 1.0], [8, 16], [0, 1, 2, 3], list(range(0, 60, 10))


def value(lr: float, seed: int, step: int, width: int) -> float:
    """Known metric: lr * step + seed**2 (+ width/100), so the seeds spread unevenly."""
    return lr * step + seed ** 2 + width / 100


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 lrs x 2 widths x 4 seeds, tracked; run (lr=0.1, width=8, seed=3) has NaN test_loss at step 20."""
    root = tmp_path_factory.mktemp("fig") / "store"
    for lr in LRS:
        for w in WIDTHS:
            for s in SEEDS:
                with raydyn.track(root, sweep="s", config={"lr": lr, "width": w, "seed": s}) as run:
                    for step in STEPS:
                        v = value(lr, s, step, w)
                        if (lr, w, s, step) == (0.1, 8, 3, 20):
                            v = float("nan")
                        run.log(step, train_loss=v / 2, test_loss=v)
    st = open_store(root)
    runs = st.runs(sweep="s")  # a label column from an analysis summary table (as `raydyn analyze phase` writes)
    st.write_part("regime_summary", "s", "main", pa.table({
        "run_id": runs.column("run_id"), "regime": ["big" if lr > 0.5 else "small" for lr in runs.column("lr").to_pylist()]}))
    return st


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r


# ------------------------------------------------------------------------------ curves: the table
@pytest.mark.parametrize("band", ["iqr", "std", "minmax", "none"])
def test_curve_table_equals_numpy(store, band):
    t = curve_table(store, "s", "test_loss", "lr", None, band)
    assert t.column_names[:4] == ["facet", "group", "step", "median"] and t.column_names[-2:] == ["n", "runs"]
    rows = {(r["group"], r["step"]): r for r in t.to_pylist()}
    assert len(rows) == len(LRS) * len(STEPS)
    for lr in LRS:
        for step in STEPS:
            v = np.array([value(lr, s, step, w) for w in WIDTHS for s in SEEDS
                          if (lr, w, s, step) != (0.1, 8, 3, 20)])
            r = rows[(lr, step)]
            assert r["n"] == v.size and r["runs"] == 8
            assert abs(r["median"] - np.median(v)) < 1e-12
            if band == "iqr":
                q25, q75 = np.percentile(v, [25, 75])
                assert abs(r["q25"] - q25) < 1e-12 and abs(r["q75"] - q75) < 1e-12
            elif band == "std":
                assert abs(r["mean"] - v.mean()) < 1e-12 and abs(r["std"] - v.std(ddof=1)) < 1e-12
            elif band == "minmax":
                assert r["min"] == v.min() and r["max"] == v.max()
    assert rows[(0.1, 20)]["n"] == 7  # the NaN step of one run is skipped, the others count


def test_curve_table_facets(store):
    t = curve_table(store, "s", "test_loss", "lr", "width", "iqr")
    assert sorted(set(t.column("facet").to_pylist())) == WIDTHS
    r = [x for x in t.to_pylist() if (x["facet"], x["group"], x["step"]) == (16, 1.0, 50)][0]
    v = np.array([value(1.0, s, 50, 16) for s in SEEDS])
    assert r["n"] == 4 and abs(r["median"] - np.median(v)) < 1e-12
    assert abs(r["q25"] - np.percentile(v, 25)) < 1e-12 and abs(r["q75"] - np.percentile(v, 75)) < 1e-12
    assert t.schema.metadata[b"raydyn.facet"] == b"width"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"metric": "nope"}, "metrics: test_loss, train_loss"),
    ({"group_by": "nope"}, "--group-by 'nope' is not a column"),
    ({"facet": "nope"}, "--facet 'nope' is not a column"),
    ({"facet": "lr"}, "must differ"),
    ({"band": "sd"}, "--band 'sd': allowed values are iqr, std, minmax, none"),
])
def test_curve_table_errors(store, kwargs, fragment):
    args = {"metric": "test_loss", "group_by": "lr", "facet": None, "band": "iqr", **kwargs}
    with pytest.raises(RaydynError) as e:
        curve_table(store, "s", **args)
    assert fragment in str(e.value)
    if "group_by" in kwargs:
        assert "lr" in str(e.value) and "width" in str(e.value)  # the usable columns are listed


# ------------------------------------------------------------------------------ curves: the figure
def test_curves_figure(store):
    fig = render_curves(curve_table(store, "s", "test_loss", "lr", "width", "iqr"), log_y=True)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["width=8", "width=16"]
    assert all(len(ax.get_lines()) == 3 for ax in panels) and panels[0].get_yscale() == "log"
    assert panels[0].get_ylabel() == "test loss" and panels[0].get_xlabel() == "step"
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "learning rate η"
    assert [t.get_text() for t in legend.get_texts()] == ["0.01", "0.1", "1"]
    assert any("interquartile" in t for t in texts(fig))
    # the line of lr=0.1, width=8 is the median per step, the NaN step included (over 3 seeds)
    x, y = panels[0].get_lines()[1].get_data()
    assert list(x) == STEPS
    assert y[2] == pytest.approx(np.median([value(0.1, s, 20, 8) for s in (0, 1, 2)]), abs=1e-12)
    plt.close(fig)


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_curves_cli_writes_each_format(store, tmp_path, suffix, magic):
    out = tmp_path / f"c{suffix}"
    r = invoke("curves", "s", "--metric", "test_loss", "--group-by", "lr", "--facet", "width", "--band", "std",
               "--store", store.local_path(), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(magic)
    if suffix == ".svg":
        assert "<svg" in out.read_text()


@pytest.mark.parametrize("args,fragment", [
    (["--out", "c.jpg"], "suffix '.jpg'"),
    (["--metric", "loss"], "metrics: test_loss, train_loss"),
    (["--group-by", "depth"], "--group-by 'depth' is not a column"),
    (["--band", "sd"], "--band 'sd'"),
])
def test_curves_cli_errors(store, args, fragment):
    r = invoke("curves", "s", "--store", store.local_path(), *args)
    assert isinstance(r.exception, RaydynError) and fragment in str(r.exception), r.output


# ------------------------------------------------------------------------------ phase maps
def test_readable_names():
    assert readable("lr") == "learning rate η" and readable("width") == "width (units per layer)"
    assert readable("weight_decay") == "weight decay λ" and readable("momentum") == "momentum β"
    assert readable("depth") == "depth (layers)" and readable("batch_size") == "batch size"
    assert readable("final_test_loss") == "final test loss" and readable("model_options.k") == "model options k"


def _caption(fig) -> str:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"][0]


def test_phase_map_labels_and_captions(store):
    runs = store.runs(sweep="s")
    info = phase_map_info(runs, "final_test_loss", "lr", "width")
    fig = render_phase_map(info)
    panel = fig.axes[0]
    assert panel.get_xlabel() == "learning rate η" and panel.get_ylabel() == "width (units per layer)"
    assert _caption(fig) == "final test loss (median over seeds, 4 per cell)"
    plt.close(fig)
    fig = render_phase_map(info, "my title", xlabel="η", ylabel="units")
    assert fig.axes[0].get_xlabel() == "η" and fig.axes[0].get_ylabel() == "units"
    assert fig.get_suptitle() == "my title"
    plt.close(fig)
    # seed on an axis: no seeds aggregated; the cells still hold two widths
    info = phase_map_info(runs, "final_test_loss", "lr", "seed")
    assert colorbar_caption(info) == "final test loss (median over 2 runs per cell, differing in width)"
    # one run per cell (seed on y, width as facets; or seed as facets): just the metric
    assert colorbar_caption(phase_map_info(runs, "final_test_loss", "lr", "seed", ["width"])) == "final test loss"
    assert colorbar_caption(phase_map_info(runs, "final_test_loss", "lr", "width", ["seed"])) == "final test loss"


def test_phase_map_colour_scale_options(store):
    runs = store.runs(sweep="s")
    info = phase_map_info(runs, "final_test_loss", "lr", "width")

    def norm(**kw):
        fig = render_phase_map(info, **kw)
        n = fig.axes[0].collections[0].norm
        plt.close(fig)
        return n

    assert not isinstance(norm(), LogNorm)  # 3.7..64: less than 100x, linear by default
    n = norm(log_color=True, vmin=1, vmax=100, cmap="magma")
    assert isinstance(n, LogNorm) and (n.vmin, n.vmax) == (1, 100)
    assert not isinstance(norm(log_color=False), LogNorm)
    wide = phase_map_info(runs, "final_test_loss", "lr", "width")
    wide.median = wide.median * np.array([1, 1e3, 1e6])  # spans > 100x: log by default, --linear-color switches it off
    assert isinstance(render_phase_map(wide).axes[0].collections[0].norm, LogNorm)
    assert not isinstance(render_phase_map(wide, log_color=False).axes[0].collections[0].norm, LogNorm)
    plt.close("all")
    for kw, fragment in [({"vmin": 5, "vmax": 2}, "must be below --vmax"), ({"log_color": True, "vmin": 0}, "positive"),
                         ({"cmap": "nope"}, "--cmap 'nope'"), ({"spread": "sd"}, "--spread 'sd'")]:
        with pytest.raises(RaydynError) as e:
            render_phase_map(info, **kw)
        assert fragment in str(e.value)


def _two_seed_runs() -> pa.Table:
    """One cell (lr=0.1, width=8) with two seeds at 0.87 and 1.78, one (lr=1, width=8) with a single run."""
    rows = [(0.1, 8, 0, 0.87), (0.1, 8, 1, 1.78), (1.0, 8, 0, 2.5)]
    return pa.table({"run_id": [f"r{i}" for i in range(3)], "status": ["completed"] * 3,
                     "lr": [r[0] for r in rows], "width": [r[1] for r in rows], "seed": [r[2] for r in rows],
                     "final_test_loss": [r[3] for r in rows],
                     "config_json": [json.dumps({"lr": r[0], "width": r[1], "seed": r[2]}) for r in rows]})


@pytest.mark.parametrize("spread,band_text,width_text", [("minmax", "0.87–1.78", "0.91"), ("iqr", "1.1–1.55", "0.455")])
def test_spread_shows_both_seeds(spread, band_text, width_text):
    info = phase_map_info(_two_seed_runs(), "final_test_loss", "lr", "width")
    assert info.median[0, 0, 0] == pytest.approx(1.325) and (info.lo[0, 0, 0], info.hi[0, 0, 0]) == (0.87, 1.78)
    fig = render_phase_map(info, spread=spread)
    t = texts(fig)
    assert f"1.32\n{band_text}" in t  # the median and, below it, the spread of the cell
    assert width_text in t  # the spread panel writes the cell's spread width
    assert "2.5" in t  # a one-run cell shows just its value
    captions = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert captions[0].startswith("final test loss (median over seeds, 1–2 per cell)")
    assert captions[1] == f"final test loss: {'range' if spread == 'minmax' else 'IQR'} over seeds " \
                          f"({'max − min' if spread == 'minmax' else 'q75 − q25'})"
    plt.close(fig)


def test_phase_map_cli_formats_and_spread(store, tmp_path):
    for suffix, magic in [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF"), (".svg", b"<?xml")]:
        out = tmp_path / f"m{suffix}"
        r = invoke("phase-map", "s", "--x", "lr", "--y", "width", "--store", store.local_path(), "--out", str(out),
                   "--spread", "minmax", "--title", "Figure 2", "--xlabel", "step size")
        assert r.exit_code == 0, r.output
        assert out.read_bytes().startswith(magic)
    svg = (tmp_path / "m.svg").read_text()
    lo, hi = value(1.0, 0, 50, 16), value(1.0, 3, 50, 16)
    assert f"{lo:.3g}–{hi:.3g}" in svg and "Figure 2" in svg and "step size" in svg  # matplotlib's text comments


def test_dpi_sets_png_size(store, tmp_path):
    sizes = []
    for dpi in (50, 100):
        out = tmp_path / f"m{dpi}.png"
        r = invoke("phase-map", "s", "--store", store.local_path(), "--out", str(out), "--dpi", str(dpi))
        assert r.exit_code == 0, r.output
        sizes.append(struct.unpack(">II", out.read_bytes()[16:24]))
    assert abs(sizes[1][0] / sizes[0][0] - 2) < 0.05


@pytest.mark.parametrize("args,fragment", [
    (["--out", "m.jpg"], "--out 'm.jpg': suffix '.jpg'; a figure is written as .png, .pdf or .svg"),
    (["--out", "m"], "no suffix"),
    (["--spread", "std"], "--spread 'std': allowed values are iqr, minmax"),
    (["--metric", "regime", "--cmap", "magma"], "--cmap: only for a numeric metric"),
])
def test_phase_map_cli_refuses(store, args, fragment):
    r = invoke("phase-map", "s", "--store", store.local_path(), *args)
    assert isinstance(r.exception, RaydynError) and fragment in str(r.exception), r.output


def test_bad_suffix_refused_by_the_library(store, tmp_path):
    info = phase_map_info(store.runs(sweep="s"), "final_test_loss", "lr", "width")
    with pytest.raises(RaydynError, match="suffix '.eps'"):
        draw_phase_map(info, tmp_path / "m.eps")
    assert not (tmp_path / "m.eps").exists()


def test_categorical_map_labels(store, tmp_path):
    out = tmp_path / "cat.svg"
    r = invoke("phase-map", "s", "--metric", "regime", "--store", store.local_path(), "--out", str(out),
               "--ylabel", "hidden units", "--title", "Regimes")
    assert r.exit_code == 0, r.output
    svg = out.read_text()
    assert "learning rate η" in svg and "hidden units" in svg and "Regimes" in svg


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible texts (titles, axis labels, tick labels, colour-bar labels, suptitle) whose boxes overlap."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = []
    for i, ax in enumerate(fig.axes):
        items = [ax.title, ax.xaxis.label, ax.yaxis.label] + ax.get_xticklabels() + ax.get_yticklabels()
        for t in items:
            if t.get_visible() and t.get_text():
                boxes.append((f"axes{i}:{t.get_text()!r}", t.get_window_extent(r)))
    if fig._suptitle is not None:
        boxes.append(("suptitle", fig._suptitle.get_window_extent(r)))
    bad = []
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (na, ba), (nb, bb) = boxes[a], boxes[b]
            if ba.width and bb.width and ba.overlaps(bb):
                bad.append((na, nb))
    return bad


def test_many_facets_do_not_collide():
    """8 facets of two long-named columns: panel titles, axis and tick labels stay apart (also with --spread)."""
    rows = []
    for wd in (0.0, 1e-4, 1e-3, 1e-2):
        for bs in (32, 1024):
            for lr in np.geomspace(1e-4, 1.0, 13):
                for w in (8, 16, 32, 64, 128):
                    for s in (0, 1):
                        rows.append({"run_id": f"{wd}-{bs}-{lr}-{w}-{s}", "status": "completed", "weight_decay": wd,
                                     "batch_size_per_device": bs, "lr": float(lr), "width": w, "seed": s,
                                     "final_test_loss": float(lr * w + s + wd)})
    info = phase_map_info(pa.Table.from_pylist(rows), "final_test_loss", "lr", "width",
                          ["weight_decay", "batch_size_per_device"])
    assert len(info.facet_values) == 8
    for spread in (None, "iqr"):
        fig = render_phase_map(info, spread=spread)
        assert _overlaps(fig) == []
        plt.close(fig)


def test_help_lists_the_figure_options():
    r = invoke("phase-map", "--help")
    assert r.exit_code == 0
    for opt in ("--title", "--xlabel", "--ylabel", "--cmap", "--vmin", "--vmax", "--log-color", "--linear-color",
                "--dpi", "--spread", "--out"):
        assert opt in r.output, opt
    r = invoke("curves", "--help")
    assert r.exit_code == 0 and all(o in r.output for o in ("--group-by", "--facet", "--band", "--log-y", "--store"))
