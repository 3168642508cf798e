"""``raydyn report SWEEP``: one self-contained HTML page (no network, no external scripts).

Contents: phase maps of the chosen metrics (PNG, embedded); an interactive **Curves** view, the
same as ``raydyn curves`` (:mod:`raydyn.aggregate.curves`): per group of runs the median curve of a
metric over steps with a band over the group's runs, with selectors for the metric (every numeric
column of the metrics table), the group-by axis (the swept axes except seed, or none), a facet axis
(one panel per value), the band (``iqr | std | minmax | none``; ``std`` draws mean ± std around the
mean, as ``raydyn curves`` does) and a log-y toggle; the run table (sortable by clicking a header,
filterable by typing), whose rows toggle that run's curves in an overlay plot (several at once); and
a section per analysis present in the store: the ``report`` hook of each registered analysis
(:mod:`raydyn.jobs.registry`) returns (title, PNG bytes) pairs; the page does not know about any analysis.

Plots are drawn by Plotly (hover, zoom, axis ticks), whose standalone bundle from the ``plotly``
wheel is inlined in the page; a Content-Security-Policy ``<meta>`` forbids the page to load anything
(no network, no other file). Every run's curves are embedded, with no cap on the number of runs: the
metrics rows sorted by (run, step) as base64 typed arrays (per run an offset, per row the index of
its step in the union of steps, per metric one float32 array, float64 where a finite value exceeds
float32's range; missing values are NaN), built with numpy/pyarrow, never a loop over rows. The page
computes the median and band per (facet, group, step) with :mod:`raydyn.aggregate.curves`'s definitions:
non-finite values are skipped per step, quantiles interpolate linearly (numpy's default, DuckDB's
``quantile_cont``), ``std`` is the sample standard deviation. Groups are the distinct values of the
runs-table column, labelled and coloured as :mod:`raydyn.plots.curves` does.

Opened with ``#selftest`` after its file URL the page drives its own controls through their real
``change``/``click`` handlers and writes what Plotly drew into ``<body data-selftest>`` (used by the
tests in headless Chromium, which cannot click).
"""
from __future__ import annotations

import base64
import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydyn.aggregate.maps import default_facets, phase_map_info, runs_with_metrics
from raydyn.plots.labels import fig_png
from raydyn.plots.maps import render_phase_map

#: Curve columns listed first in the metric selector (any other numeric metrics column follows).
CURVE_COLUMNS = ("test_loss", "train_loss", "batch_loss", "test_acc", "train_acc", "grad_norm")
#: The page draws at most this many groups (and facet panels); it says so when there are more.
MAX_GROUPS_DRAWN = 100
MAX_FACETS_DRAWN = 24

_KEYS = ("run_id", "step", "sweep")
_F32_MAX = float(np.finfo(np.float32).max)
#: Loads nothing: inline scripts and styles, data: images only, no fetch/XHR, no frames, no fonts.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")


def analysis_sections(store, sweep: str) -> list[tuple[str, str]]:
    """(name, HTML) of every registered analysis' report section whose tables are in the store."""
    from raydyn.jobs.registry import analyses

    sections = []
    tables = set(store.tables())
    for name, a in analyses().items():
        fn = a.report_fn() if a.report else None
        if fn is None or not any(t.startswith(p) for t in tables for p in a.table_prefixes):
            continue
        try:
            figs = fn(store, sweep)
        except Exception as e:  # a broken section must not lose the rest of the report
            sections.append((name, f"<p class='err'>could not draw {html.escape(name)}: {html.escape(str(e))}</p>"))
            continue
        if figs:
            sections.append((name, "".join(f"<figure>{_img(png, t)}<figcaption>{html.escape(t)}</figcaption></figure>"
                                           for t, png in figs)))
    return sections


def _png(fig) -> bytes:
    return fig_png(fig, tight=False)


def _img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _float64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    col = pc.cast(col, pa.float64())
    return np.asarray(pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def _cells(col: pa.ChunkedArray) -> list:
    """A runs-table column as JSON-able values: non-finite floats as None (JSON has no NaN)."""
    if pa.types.is_floating(col.type):
        col = pc.if_else(pc.is_finite(col), col, pa.scalar(None, col.type))
    return col.to_pylist()


def _sort_key(v: Any) -> tuple[int, Any]:
    """Group order of raydyn.plots.curves: numbers ascending, then text, then None (NaN before None)."""
    if v is None:
        return (3, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (2, "") if isinstance(v, float) and math.isnan(v) else (0, v)
    return (1, str(v))


def _group_axes(runs: pa.Table, axes: Sequence[str]) -> list[dict[str, Any]]:
    """The group-by/facet choices: the swept axes except seed, as runs-table columns.

    Each: ``column``, ``label`` (readable name), ``values`` (labels of the distinct values in curve
    order), ``colors`` (per value, as raydyn.plots.curves colours groups) and ``codes`` (base64 int32:
    per run of ``runs``, the index of its value).
    """
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize, to_hex

    from raydyn.aggregate.axes import is_log_spaced
    from raydyn.plots.labels import fmt_value, readable
    from raydyn.spec import column_name

    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for a in axes:
        c = a if a in runs.column_names else column_name(a)
        if "seed" in (a, c) or c in seen or c not in runs.column_names:
            continue
        col = runs.column(c)
        if pa.types.is_nested(col.type):
            continue
        seen.add(c)
        values = sorted(pc.unique(col).to_pylist(), key=_sort_key)
        codes = pc.index_in(col, value_set=pa.array(values, type=col.type), skip_nulls=False)
        if codes.null_count:  # cannot happen: every value is in the set
            raise AssertionError(f"report: column {c!r} has values outside its distinct values")
        numeric = all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in values)
        finite = [float(g) for g in values if numeric and math.isfinite(g)]
        if numeric and len(finite) > 1:
            cmap = matplotlib.colormaps["viridis"]
            norm = LogNorm(min(finite), max(finite)) if is_log_spaced(finite) else Normalize(min(finite), max(finite))
            colors = [to_hex(cmap(0.9 * float(norm(g)))) if math.isfinite(g) else "#888888" for g in values]
        elif numeric:
            colors = [to_hex(matplotlib.colormaps["viridis"](0.45))] * len(values)
        else:
            tab = matplotlib.colormaps["tab10"]
            colors = [to_hex(tab(i % 10)) for i in range(len(values))]
        out.append({"column": c, "label": readable(c), "values": [fmt_value(g) for g in values], "colors": colors,
                    "codes": _b64(codes.to_numpy(zero_copy_only=False).astype("<i4"))})
    return out


def _curve_data(store: Any, sweep: str, run_ids: pa.Array) -> dict[str, Any] | None:
    """Every run's curves, compactly: the metrics rows of the runs in ``run_ids`` sorted by (run, step).

    ``steps``: the union of steps (sorted); ``offsets`` (base64 int32, len(run_ids)+1): run ``r``'s rows
    are ``offsets[r]:offsets[r+1]``; ``step_index`` (base64 uint16, int32 past 65535 steps): per row,
    its step's index in ``steps``; ``metrics``: per numeric metrics column with a finite value, its
    values per row (base64 float32, NaN where null; float64 when a finite value is out of float32's
    range). Vectorised: one sort, no loop over rows or runs. None when the sweep has no metrics.
    """
    mt = store.table("metrics", sweep=sweep)
    if mt.num_rows == 0 or "run_id" not in mt.column_names or "step" not in mt.column_names:
        return None
    numeric = [f.name for f in mt.schema if f.name not in _KEYS
               and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]
    numeric = [c for c in CURVE_COLUMNS if c in numeric] + sorted(c for c in numeric if c not in CURVE_COLUMNS)
    ri = pc.fill_null(pc.index_in(mt.column("run_id"), value_set=run_ids), -1).to_numpy(zero_copy_only=False)
    step_valid = pc.is_valid(mt.column("step")).to_numpy(zero_copy_only=False)
    step = pc.fill_null(pc.cast(mt.column("step"), pa.int64()), 0).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero((ri >= 0) & step_valid)  # rows of runs in the table, with a step
    order = keep[np.lexsort((step[keep], ri[keep]))]
    steps, sidx = np.unique(step[order], return_inverse=True)
    offsets = np.searchsorted(ri[order], np.arange(len(run_ids) + 1), side="left")
    metrics = []
    for name in numeric:
        v = _float64(mt.column(name))[order]
        fin = np.isfinite(v)
        if not fin.any():
            continue  # never logged (e.g. accuracy of a regression task)
        wide = bool(np.abs(v[fin]).max() > _F32_MAX)
        metrics.append({"name": name, "dtype": "f8" if wide else "f4",
                        "data": _b64(v.astype("<f8" if wide else "<f4"))})
    if not metrics:
        return None
    small = len(steps) <= np.iinfo(np.uint16).max
    return {"steps": steps.tolist(), "offsets": _b64(offsets.astype("<i4")),
            "step_index_dtype": "u2" if small else "i4", "step_index": _b64(sidx.astype("<u2" if small else "<i4")),
            "metrics": metrics, "rows": int(order.size)}


def _plotly_js() -> str:
    """Plotly's standalone bundle, from the plotly wheel (no CDN)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as e:
        from raydyn.errors import RaydynError

        raise RaydynError(f"raydyn report draws its curves with plotly.js from the plotly package, which is not "
                          f"importable ({e}); install it: pip install 'plotly>=5'") from None
    js = get_plotlyjs()
    if "</script" in js.lower():  # would end the inline <script> early
        raise RuntimeError("the plotly.js bundle contains '</script' and cannot be inlined")
    return js


def build_report(store, sweep: str, out: str | Path, metrics: Sequence[str] = ("final_test_loss", "final_test_acc"),
                 x: str | None = None, y: str | None = None, axes: Sequence[str] = ()) -> Path:
    """Write the report of ``sweep`` to ``out``; returns the path.

    ``axes`` are the sweep's swept parameters (x and y default to the first two that are not seed;
    the curves view groups and facets by any of them except seed).
    """
    import matplotlib

    from raydyn.plots.labels import readable
    from raydyn.spec import column_name

    matplotlib.use("Agg")
    runs = runs_with_metrics(store, sweep)
    if runs.num_rows == 0:
        from raydyn.errors import RaydynError

        raise RaydynError(f"sweep {sweep!r} has no runs in store {store.uri}")
    plotly_js = _plotly_js()  # before any work: without plotly there is no page
    swept = [a for a in axes if a != "seed" and a in runs.column_names]
    x = x or (swept[0] if swept else None)
    y = y or (swept[1] if len(swept) > 1 else None)

    maps = []
    if x and y:
        from raydyn.aggregate.categorical import category_map_info, is_categorical
        from raydyn.plots.maps import render_category_map

        for m in metrics:
            if m not in runs.column_names:
                continue
            if is_categorical(runs, m):  # labels such as phase: a categorical map with boundaries
                if runs.column(m).null_count < runs.num_rows:
                    info = category_map_info(runs, m, x, y, default_facets(axes, x, y))
                    maps.append((m, _png(render_category_map(info, title=f"{sweep}: {m}"))))
                continue
            col = np.asarray(runs.column(m).to_numpy(zero_copy_only=False), dtype=float)
            if not np.isfinite(col).any():
                continue
            info = phase_map_info(runs, m, x, y, default_facets(axes, x, y))
            maps.append((m, _png(render_phase_map(info, title=f"{sweep}: {m}"))))

    # run table: identity, status, swept axes, final metrics and analysis metrics
    axis_cols = [c for c in dict.fromkeys(a if a in runs.column_names else column_name(a) for a in axes)
                 if c in runs.column_names and not pa.types.is_nested(runs.schema.field(c).type)]
    fixed = ["run_id", "status"] + axis_cols
    extra = [c for c in runs.column_names if (c.startswith("final_") or c in ("diverged_step", "max_train_loss"))
             or c.startswith(("koopman_", "hmm_", "cmd_", "sym_", "opt_", "basin_", "phase", "convergence"))]
    cols = [c for c in dict.fromkeys(fixed + extra) if c in runs.column_names]
    rows = [list(r) for r in zip(*(_cells(runs.column(c)) for c in cols))]

    # every run's curves (no cap), and the group-by / facet choices
    run_ids = runs.column("run_id").combine_chunks()
    curves = _curve_data(store, sweep, run_ids)
    groups = _group_axes(runs, axes)
    if curves:
        for m in curves["metrics"]:
            m["label"] = readable(m["name"])

    sections = analysis_sections(store, sweep)

    data = {"sweep": sweep, "columns": cols, "rows": rows, "label_columns": axis_cols, "groups": groups,
            "curves": curves, "max_groups": MAX_GROUPS_DRAWN, "max_facets": MAX_FACETS_DRAWN}
    page = TEMPLATE.format(
        csp=html.escape(CSP),
        title=html.escape(f"raydyn report: {sweep}"),
        sweep=html.escape(sweep),
        n_runs=runs.num_rows,
        store=html.escape(store.uri),
        maps="".join(f"<figure>{_img(png, m)}<figcaption>{html.escape(m)}</figcaption></figure>" for m, png in maps)
        or ("<p>No phase map: the sweep has fewer than two swept axes besides seed.</p>" if not (x and y) else
            f"<p>No phase map: none of {html.escape(', '.join(metrics))} has a finite value in this sweep.</p>"),
        sections="".join(f"<section><h2>{html.escape(name)}</h2>{body}</section>" for name, body in sections)
        or "<p>No analyses in the store yet (run <code>raydyn analyze ...</code>).</p>",
        data=json.dumps(data, separators=(",", ":"), default=str).replace("</", "<\\/"),
        plotly=plotly_js,
        script=resources.files("raydyn.report").joinpath("report.js").read_text(encoding="utf-8"),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# The first script (before Plotly's) collects script errors, rejected promises, console.error calls and
# blocked loads (CSP violations) into <body data-errors> (a count) and window.__errors (the messages).
TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} h1{{margin-bottom:.2em}}
.meta{{color:#666}} figure{{display:inline-block;margin:.5em}} img.plot{{max-width:100%;border:1px solid #ddd}}
figcaption{{text-align:center;color:#555;font-size:.9em}}
table{{border-collapse:collapse;font-size:.85em}} th,td{{border:1px solid #ddd;padding:2px 6px;text-align:right}}
th{{cursor:pointer;background:#f3f3f3;position:sticky;top:0}} tr.sel{{background:#fff3c4}} tbody tr:hover{{background:#eef}}
tbody tr{{cursor:pointer}}
#tablewrap{{max-height:480px;overflow:auto;display:inline-block;vertical-align:top}}
#overlay{{display:inline-block;vertical-align:top;margin-left:1em;width:min(640px,95vw)}}
.controls label{{margin-right:1em;white-space:nowrap}} .controls select{{margin-left:.3em}}
.note{{color:#666;font-size:.9em}} .err{{color:#b00}} input#filter{{margin:.5em 0;padding:3px;width:24em}}
#curves-plot{{width:100%;min-height:300px}}
</style>
<script>
window.__errors = [];
(function(){{
  function rec(m){{ window.__errors.push(String(m)); if (document.body) document.body.dataset.errors = window.__errors.length; }}
  window.addEventListener('error', function(e){{ rec(e.message || ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || '?'))); }}, true);
  window.addEventListener('unhandledrejection', function(e){{ rec('unhandled rejection: ' + ((e.reason && e.reason.message) || e.reason)); }});
  document.addEventListener('securitypolicyviolation', function(e){{ rec('blocked by the page\\'s no-network policy: ' + e.blockedURI + ' (' + e.violatedDirective + ')'); }});
  var ce = console.error;
  console.error = function(){{ rec('console.error: ' + Array.prototype.join.call(arguments, ' ')); return ce.apply(console, arguments); }};
}})();
</script>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{n_runs} runs · store <code>{store}</code></p>
<h2>Phase maps</h2>
<div id="maps">{maps}</div>
<h2>Curves</h2>
<div class="controls" id="curves-controls">
<label>metric<select id="c-metric"></select></label>
<label>group by<select id="c-group"></select></label>
<label>facet<select id="c-facet"></select></label>
<label>band<select id="c-band"><option value="iqr">iqr (25–75 %)</option><option value="std">± std (around the mean)</option><option value="minmax">min–max</option><option value="none">none</option></select></label>
<label><input type="checkbox" id="c-logy"> log y</label>
</div>
<div id="curves-plot"></div>
<p class="note" id="curves-caption"></p>
<h2>Runs</h2>
<input id="filter" placeholder="filter rows (e.g. diverged, 0.1)"> <span class="note" id="rows-note"></span>
<div><div id="tablewrap"><table id="runs"><thead></thead><tbody></tbody></table></div>
<div id="overlay"><div id="overlay-plot"></div>
<p class="note">Click rows of the table to overlay their curves (the metric and log y chosen above); click again to remove. <button id="overlay-clear" type="button">clear</button></p></div></div>
{sections}
<script id="data" type="application/json">{data}</script>
<script id="plotlyjs">{plotly}</script>
<script>{script}</script>
</body></html>
"""
