"""``raydyn report SWEEP``: one self-contained HTML page (no network, no external scripts).

Contents: phase maps of the chosen metrics (PNG, embedded), the run table (sortable by
clicking a header, filterable by typing), per-run curves drawn on click (inline SVG from
embedded JSON), and a section per analysis present in the store. Analyses add their
section by registering a function in :data:`SECTIONS` that returns (title, PNG bytes)
pairs; the page does not know about any analysis.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from raydyn.phase.maps import default_facets, phase_map_info, render_phase_map, runs_with_metrics

# table-name prefix -> fn(store, sweep) -> list of (title, png bytes)
SECTIONS: dict[str, Callable[[Any, str], list[tuple[str, bytes]]]] = {}

MAX_CURVES = 500
CURVE_COLUMNS = ("batch_loss", "train_loss", "test_loss", "train_acc", "test_acc", "grad_norm")


def fig_png(fig, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (90 dpi), closing it; for report sections."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def _png(fig) -> bytes:
    return fig_png(fig, tight=False)


def _img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def build_report(store, sweep: str, out: str | Path, metrics: Sequence[str] = ("final_test_loss", "final_test_acc"),
                 x: str | None = None, y: str | None = None, axes: Sequence[str] = ()) -> Path:
    """Write the report of ``sweep`` to ``out``; returns the path.

    ``axes`` are the sweep's swept parameters (x and y default to the first two that are not seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    runs = runs_with_metrics(store, sweep)
    if runs.num_rows == 0:
        from raydyn.errors import RaydynError

        raise RaydynError(f"sweep {sweep!r} has no runs in store {store.uri}")
    swept = [a for a in axes if a != "seed" and a in runs.column_names]
    x = x or (swept[0] if swept else None)
    y = y or (swept[1] if len(swept) > 1 else None)

    maps = []
    if x and y:
        from raydyn.phase.categorical import category_map_info, is_categorical, render_category_map

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
    fixed = ["run_id", "status"] + [a for a in axes if a in runs.column_names]
    extra = [c for c in runs.column_names if (c.startswith("final_") or c in ("diverged_step", "max_train_loss"))
             or c.startswith(("koopman_", "hmm_", "cmd_", "sym_", "opt_", "basin_", "phase", "convergence"))]
    cols = list(dict.fromkeys(fixed + extra))
    d = runs.select(cols).to_pydict()
    rows = [[_jsonable(d[c][i]) for c in cols] for i in range(runs.num_rows)]

    # curves for up to MAX_CURVES runs
    ids = d["run_id"][:MAX_CURVES]
    mt = store.table("metrics", sweep=sweep)
    curves: dict[str, dict[str, list]] = {}
    if mt.num_rows:
        import pyarrow.compute as pc

        keep = [c for c in ("run_id", "step") + CURVE_COLUMNS if c in mt.column_names]
        mt = mt.select(keep).filter(pc.field("run_id").isin(ids))
        md = mt.to_pydict()
        for i, rid in enumerate(md["run_id"]):
            c = curves.setdefault(rid, {k: [] for k in keep if k != "run_id"})
            for k in c:
                c[k].append(_jsonable(md[k][i]))

    from raydyn.jobs import load_all

    load_all()  # job modules register their report sections
    sections = []
    tables = set(store.tables())
    for prefix, fn in SECTIONS.items():
        # a section runs when a table starts with its prefix, or (``fn.also_when``) one of those tables exists
        if any(t.startswith(prefix) for t in tables) or set(getattr(fn, "also_when", ())) & tables:
            try:
                figs = fn(store, sweep)
            except Exception as e:  # a broken section must not lose the rest of the report
                sections.append((prefix.strip("_"), f"<p class='err'>could not draw {html.escape(prefix)}: {html.escape(str(e))}</p>"))
                continue
            if not figs:
                continue
            body = "".join(f"<figure>{_img(png, t)}<figcaption>{html.escape(t)}</figcaption></figure>" for t, png in figs)
            sections.append((prefix.strip("_"), body))

    page = TEMPLATE.format(
        title=html.escape(f"raydyn report: {sweep}"),
        sweep=html.escape(sweep),
        n_runs=runs.num_rows,
        store=html.escape(store.uri),
        maps="".join(f"<figure>{_img(png, m)}<figcaption>{html.escape(m)}</figcaption></figure>" for m, png in maps)
        or "<p>No phase map: the sweep has fewer than two swept axes besides seed.</p>",
        sections="".join(f"<section><h2>{html.escape(name)}</h2>{body}</section>" for name, body in sections)
        or "<p>No analyses in the store yet (run <code>raydyn analyze ...</code>).</p>",
        data=json.dumps({"columns": cols, "rows": rows, "curves": curves}, separators=(",", ":"), default=str)
        .replace("</", "<\\/"),
        script=SCRIPT,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} h1{{margin-bottom:.2em}}
.meta{{color:#666}} figure{{display:inline-block;margin:.5em}} img.plot{{max-width:100%;border:1px solid #ddd}}
figcaption{{text-align:center;color:#555;font-size:.9em}}
table{{border-collapse:collapse;font-size:.85em}} th,td{{border:1px solid #ddd;padding:2px 6px;text-align:right}}
th{{cursor:pointer;background:#f3f3f3;position:sticky;top:0}} tr.sel{{background:#fff3c4}} tbody tr:hover{{background:#eef}}
#tablewrap{{max-height:420px;overflow:auto;display:inline-block}} #curve{{display:inline-block;vertical-align:top;margin-left:1em}}
.err{{color:#b00}} input{{margin:.5em 0;padding:3px;width:24em}}
</style></head>
<body>
<h1>{title}</h1>
<p class="meta">{n_runs} runs · store <code>{store}</code></p>
<h2>Phase maps</h2>
<div id="maps">{maps}</div>
<h2>Runs</h2>
<input id="filter" placeholder="filter rows (e.g. diverged, 0.1)">
<div><div id="tablewrap"><table id="runs"><thead></thead><tbody></tbody></table></div>
<div id="curve"><p>Click a run to see its curves.</p></div></div>
{sections}
<script id="data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
(function(){
  window.__errors = [];
  window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); document.body.dataset.errors = window.__errors.length; });
  var D = JSON.parse(document.getElementById('data').textContent);
  var thead = document.querySelector('#runs thead'), tbody = document.querySelector('#runs tbody');
  var sortCol = -1, sortDir = 1;
  function fmt(v){ if (v === null || v === undefined) return '–'; if (typeof v === 'number') return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(Math.round(v*1e4)/1e4); return String(v); }
  function header(){ var tr = document.createElement('tr'); D.columns.forEach(function(c,i){ var th = document.createElement('th'); th.textContent = c + (i===sortCol ? (sortDir>0?' ▲':' ▼') : ''); th.onclick = function(){ sortDir = (sortCol===i) ? -sortDir : 1; sortCol = i; render(); }; tr.appendChild(th); }); thead.innerHTML=''; thead.appendChild(tr); }
  function render(){
    header();
    var q = document.getElementById('filter').value.toLowerCase();
    var rows = D.rows.filter(function(r){ return !q || r.some(function(v){ return fmt(v).toLowerCase().indexOf(q) >= 0; }); });
    if (sortCol >= 0) rows.sort(function(a,b){ var x=a[sortCol], y=b[sortCol]; if (x===y) return 0; if (x===null) return 1; if (y===null) return -1; return (x<y?-1:1)*sortDir; });
    tbody.innerHTML = '';
    rows.forEach(function(r){ var tr = document.createElement('tr'); r.forEach(function(v){ var td = document.createElement('td'); td.textContent = fmt(v); tr.appendChild(td); }); tr.onclick = function(){ Array.prototype.forEach.call(tbody.children, function(x){x.classList.remove('sel');}); tr.classList.add('sel'); curve(r[0]); }; tbody.appendChild(tr); });
    document.body.dataset.rows = rows.length;
  }
  function curve(id){
    var c = D.curves[id], box = document.getElementById('curve');
    if (!c) { box.innerHTML = '<p>No curves stored for ' + id + '.</p>'; return; }
    var W = 460, H = 260, P = 40, series = ['batch_loss','train_loss','test_loss'].filter(function(k){ return c[k]; });
    var colors = {batch_loss:'#bbb', train_loss:'#1f77b4', test_loss:'#d62728'};
    var xs = c.step, ys = [];
    series.forEach(function(k){ c[k].forEach(function(v){ if (v !== null && v > 0 && isFinite(v)) ys.push(Math.log10(v)); }); });
    if (!ys.length) { box.innerHTML = '<p>No finite losses for ' + id + '.</p>'; return; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs) || 1, y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
    function sx(v){ return P + (W-2*P)*(v-x0)/Math.max(x1-x0,1e-12); } function sy(v){ return H-P - (H-2*P)*(v-y0)/(y1-y0); }
    var svg = '<svg xmlns="http://www.w3.org/2000/svg" width="'+W+'" height="'+H+'"><rect width="100%" height="100%" fill="white" stroke="#ddd"/>';
    series.forEach(function(k){ var d = '', pen = false; c[k].forEach(function(v,i){ if (v === null || !(v > 0)) { pen = false; return; } d += (pen?'L':'M') + sx(xs[i]).toFixed(1) + ',' + sy(Math.log10(v)).toFixed(1); pen = true; }); svg += '<path d="'+d+'" fill="none" stroke="'+colors[k]+'" stroke-width="1.5"/>'; });
    svg += '<text x="'+P+'" y="14" font-size="11">'+id+' — loss (log scale) vs step '+x0+'…'+x1+'</text>';
    series.forEach(function(k,i){ svg += '<text x="'+(W-P-90)+'" y="'+(30+14*i)+'" font-size="11" fill="'+colors[k]+'">'+k+'</text>'; });
    svg += '<text x="2" y="'+(P)+'" font-size="10">'+fmt(Math.pow(10,y1))+'</text><text x="2" y="'+(H-P)+'" font-size="10">'+fmt(Math.pow(10,y0))+'</text></svg>';
    box.innerHTML = svg;
  }
  document.getElementById('filter').addEventListener('input', render);
  render();
  var imgs = document.querySelectorAll('img.plot'), loaded = 0;
  imgs.forEach(function(im){ if (im.complete && im.naturalWidth > 0) loaded++; });
  document.body.dataset.images = loaded + '/' + imgs.length;
  if (D.rows.length) curve(D.rows[0][0]);
  document.body.dataset.ready = '1';
})();
"""
