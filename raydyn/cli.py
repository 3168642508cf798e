"""The ``raydyn`` command. Thin: parse arguments, call the package, print results.

User mistakes (:class:`raydyn.errors.RaydynError`) are printed as one clear
message and exit code 2, never as a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from raydyn.errors import RaydynError

app = typer.Typer(
    help="raydyn: train sweeps of neural networks on Ray, store their trajectories as Parquet, "
    "and map their training dynamics over hyperparameters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sweep_app = typer.Typer(help="Launch and inspect sweeps.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")
store_app = typer.Typer(help="Inspect and repair the result store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


class _AnalysisGroup(TyperGroup):
    """``raydyn analyze``: one command per registered analysis (:mod:`raydyn.jobs.registry`), generated from
    its options dataclass when listed or called, so an analysis registered after import shows up too."""

    _built: dict[str, tuple[Any, Any]] = {}

    @property
    def commands(self) -> dict[str, Any]:
        from raydyn.jobs.registry import analyses

        out = {}
        for name, a in analyses().items():
            if self._built.get(name, (None,))[0] is not a:
                self._built[name] = (a, _analysis_command(a))
            out[name] = self._built[name][1]
        return out

    @commands.setter
    def commands(self, value) -> None:  # click sets it on construction; the registry is the source
        pass

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx, name: str):
        return self.commands.get(name)


analyze_app = typer.Typer(cls=_AnalysisGroup, no_args_is_help=True,
                          help="Run an analysis over a sweep's trajectories on Ray; results go to the store.")
app.add_typer(analyze_app, name="analyze")
import_app = typer.Typer(help="Import runs trained elsewhere (checkpoint folders, TensorBoard logs) into a tracked "
                         "sweep; analyse them like any sweep.", no_args_is_help=True)
app.add_typer(import_app, name="import")

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

STORE_HELP = "Store URI: a directory, file://, s3:// or gs:// (default: $RAYDYN_STORE or ./raydyn-results)."
StoreOpt = typer.Option(None, "--store", help=STORE_HELP, show_default=False)


def _store(uri: str | None):
    from raydyn.store import open_store

    return open_store(uri)


def _resolve_sweep(sweep: str, store) -> tuple[Any, str]:
    """A sweep given as a file path or as a name stored in the store -> (spec, text)."""
    from raydyn.spec import load_sweep

    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        return load_sweep(sweep)
    from raydyn.track import parse_stored

    text = store.sweep_text(sweep)
    if text is None:
        known = store.sweeps()
        raise RaydynError(
            f"no sweep named {sweep!r} in store {store.uri}"
            + (f"; sweeps there: {', '.join(known)}" if known else " (the store has no sweeps yet)")
            + ". Give a sweep name or a sweep file path."
        )
    return parse_stored(store, sweep), text


def _fmt_time(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ------------------------------------------------------------------------------ sweep
@sweep_app.command("run")
def sweep_run(
    file: Path = typer.Argument(..., help="Sweep file (YAML).", show_default=False),
    store: Optional[str] = StoreOpt,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, "
                                          "else an embedded local Ray bound to localhost)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for the embedded local Ray (default: all)."),
    max_failures: int = typer.Option(2, "--max-failures", min=0, help="Retries of a failed trial (e.g. its node "
                                     "died); a retry resumes from the trial's last checkpoint."),
) -> None:
    """Train every run of a sweep file that is not already in the store (so re-running resumes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raydyn.spec import load_sweep

    spec, text = load_sweep(file)
    st = _store(store)
    from raydyn.sweep import run_sweep

    # the bar appears with the first progress report, so that errors found before training stand alone
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("runs · {task.fields[diverged]} diverged · {task.fields[retried]} retried · "
                              "{task.fields[failed]} failed trials"),
                   TimeElapsedColumn(), console=console, transient=False)
    task: list[Any] = []

    def update(info: dict[str, Any]) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(spec.name, total=None, diverged=0, failed=0, retried=0))
        bar.update(task[0], completed=info["done"], total=info["total"] or None, diverged=info["diverged"],
                   failed=info["failed"], retried=info.get("retried", 0))

    log = _route_ray_log(st, spec.name)
    try:
        outcome = run_sweep(spec, text, st, address=address, num_cpus=num_cpus, progress=update,
                            max_failures=max_failures)
    finally:
        bar.stop()
    if outcome.grown:  # markup off: the differences are the user's text ([...] lists)
        console.print(f"sweep {spec.name}: the sweep file grows the stored grid ({'; '.join(outcome.grown)}); the new "
                      "file is stored, the old one kept in the sweep's history.", highlight=False, markup=False)
    if outcome.trained == 0 and outcome.skipped == outcome.total and not outcome.failed_populations:
        console.print(f"sweep [bold]{spec.name}[/]: all {outcome.total} runs already in the store; nothing to train.")
    else:
        console.print(
            f"sweep [bold]{spec.name}[/]: trained {outcome.trained} runs ({outcome.diverged} diverged"
            + (f", {outcome.stopped} stopped early" if outcome.stopped else "") + "), "
            f"kept {outcome.skipped} already in the store, in {_fmt_time(outcome.elapsed_s)}."
        )
    console.print(f"store: {st.uri}")
    if outcome.failed_populations:
        _print_failures(outcome, log)
        raise typer.Exit(1)


def _route_ray_log(st, name: str) -> Path:
    """Ray's own log (start-up notices, Tune's tracebacks, workers' stderr) goes to a file of the store's log
    folder; raydyn prints one line per distinct warning or failure and names that file."""
    from rich.text import Text

    from raydyn.sweep import log_path, route_ray_logs

    return route_ray_logs(log_path(st, name),
                          warn=lambda msg: console.print(Text.assemble(("warning: ", "bold yellow"), msg), soft_wrap=True))


def _print_failures(outcome, log: Path | None) -> None:
    from rich.text import Text

    from raydyn.sweep import failure_report

    for para in failure_report(outcome.failed_populations, outcome.failures):
        console.print(Text.assemble(("failed: ", "bold red"), para), soft_wrap=True)
    from raydyn.sweep import current_log

    log = current_log() or log
    console.print("Completed runs are kept in the store."
                  + (f" Full tracebacks: {log}" if log is not None and log.exists() else ""), highlight=False)


@sweep_app.command("status")
def sweep_status_cmd(
    sweep: str = typer.Argument(..., help="Sweep file or sweep name in the store."),
    store: Optional[str] = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """How many runs of a sweep are in the store, by status, and how many are missing."""
    from raydyn.sweep import sweep_status, to_json

    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    status = sweep_status(spec, st)
    if as_json:
        out.print_json(to_json(status))
        return
    parts = ", ".join(f"{n} {s}" for s, n in sorted(status["by_status"].items())) or "none yet"
    if status.get("kind") == "tracked":
        out.print(f"sweep {status['sweep']} (tracked: runs logged with raydyn.track or imported): "
                  f"{status['in_store']} finished runs ({parts}); {status['in_progress']} in progress or interrupted"
                  + (f" ({', '.join(status['in_progress_runs'])}; resume=True finishes one)" if status["in_progress"] else "")
                  + ".")
    else:
        out.print(f"sweep {status['sweep']}: {status['in_store']}/{status['total']} runs in the store ({parts}); "
                  f"{status['missing']} missing.")
    out.print(f"store: {st.uri}")


@sweep_app.command("list")
def sweep_list_cmd(
    store: Optional[str] = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every sweep in the store, one line each: name, kind (sweep file or tracked), runs by status, created."""
    from raydyn.sweep import list_sweeps, to_json

    st = _store(store)
    rows = list_sweeps(st)
    if as_json:
        out.print_json(to_json(rows))
        return
    if not rows:
        out.print(f"no sweeps in store {st.uri}", highlight=False)
        return
    cells = []
    for r in rows:
        kind = r["kind"] + (f" ({r['method']})" if r["kind"] == "sweep file" and r["method"] else "")
        if (r["sweep_files"] or 1) > 1:
            kind += f", grown: {r['sweep_files']} files"
        parts = ", ".join(f"{n} {s}" for s, n in r["by_status"].items())
        cells.append((r["sweep"], kind, f"{r['runs']} runs" + (f" ({parts})" if parts else ""),
                      f"created {r['created']}" if r["created"] else ""))
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    for c in cells:
        out.print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[3], highlight=False, markup=False)
    out.print(f"store: {st.uri}", highlight=False)


@sweep_app.command("delete")
def sweep_delete_cmd(
    sweep: str = typer.Argument(..., help="Sweep name in the store.", show_default=False),
    store: Optional[str] = StoreOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking (for scripts)."),
) -> None:
    """Delete a sweep from the store: its parts in every table (runs, metrics, weights, analyses) and its sweep record. Tracked sweeps too. It cannot be undone."""
    from raydyn.store import validate_name

    st = _store(store)
    validate_name("sweep", sweep)
    known = st.sweeps()
    if sweep not in known:
        raise RaydynError(f"no sweep named {sweep!r} in store {st.uri}"
                          + (f"; sweeps there: {', '.join(known)}" if known else " (the store has no sweeps)"))
    tables = [t for t in st.tables() if st.parts(t, sweep)]
    n_runs = st.table("runs", sweep=sweep, columns=["run_id"]).num_rows
    kind = "tracked sweep" if (st.sweep_meta(sweep) or {}).get("kind") == "tracked" else "sweep"
    what = f"{kind} {sweep!r}: {n_runs} runs" + (f", data in {', '.join(tables)}" if tables else "")
    if not yes:
        try:
            ok = typer.confirm(f"delete {what} from store {st.uri}? This cannot be undone", default=False)
        except typer.Abort:  # no answer (end of input)
            ok = False
        if not ok:
            console.print("nothing deleted (pass --yes to delete without asking).", highlight=False)
            raise typer.Exit(1)
    deleted = st.delete_sweep(sweep)
    out.print(f"deleted {what} ({sum(deleted.values())} files) and its sweep record", highlight=False)
    out.print(f"store: {st.uri}", highlight=False)


# ------------------------------------------------------------------------------ query
def _csv_ready(table):
    """CSV has no nested values: list/struct/map columns become one JSON text per cell."""
    import pyarrow as pa

    nested = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list, pa.types.is_struct,
              pa.types.is_map)
    for i, f in enumerate(table.schema):
        if any(is_(f.type) for is_ in nested):
            text = pa.array([None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()],
                            pa.string())
            table = table.set_column(i, pa.field(f.name, pa.string()), text)
    return table


@app.command("query")
def query(
    sql: str = typer.Argument(..., help="SQL over the store's tables (runs, metrics, weights, and analysis tables)."),
    store: Optional[str] = StoreOpt,
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    max_rows: int = typer.Option(50, "--max-rows", help="Rows shown in table format (csv/json print all)."),
) -> None:
    """Run read-only SQL (DuckDB) over the store and print the result.

    Example: raydyn query "SELECT lr, width, median(final_test_loss) FROM runs GROUP BY ALL"
    """
    if fmt not in ("table", "csv", "json"):
        raise RaydynError(f"--format {fmt!r}: allowed values are table, csv, json")
    if max_rows < 0:
        raise RaydynError(f"--max-rows {max_rows}: must be 0 or more (rows shown in table format; "
                          "--format csv or json prints every row)")
    from raydyn.store._sql import check_select

    check_select(sql)  # a syntax error or a non-SELECT statement is reported first
    st = _store(store)
    if not st.exists():
        raise RaydynError(f"no store at {st.location()}: give the store with --store (or $RAYDYN_STORE)")
    table = st.sql(sql)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = __import__("io").BytesIO()
        pacsv.write_csv(_csv_ready(table), buf)
        sys.stdout.write(buf.getvalue().decode())
    elif fmt == "json":
        sys.stdout.write(json.dumps(table.to_pylist(), default=str, indent=1) + "\n")
    else:
        from rich.table import Table

        t = Table(show_lines=False)
        for name in table.column_names:
            t.add_column(name, overflow="fold")
        for row in table.slice(0, max_rows).to_pylist():
            t.add_row(*[_cell(v) for v in row.values()])
        out.print(t)
        if table.num_rows > max_rows:
            out.print(f"... {table.num_rows - max_rows} more rows (use --max-rows or --format csv)")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return f"[{len(v)} values]"
    return str(v)


# ------------------------------------------------------------------------------ phase map
@app.command("phase-map")
def phase_map(
    sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
    metric: str = typer.Option("final_test_loss", "--metric", help="Column of the runs table, or of an analysis "
                               "summary table (e.g. koopman_class, hmm_n_states, cmd_modes_needed)."),
    x: str = typer.Option("lr", "--x", help="Swept parameter on the x axis."),
    y: str = typer.Option("width", "--y", help="Swept parameter on the y axis."),
    facet: list[str] = typer.Option(None, "--facet", help="Axis for panels (repeatable). Default: every other "
                                    "swept axis except seed."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Figure path: .png, .pdf or .svg, the format "
                                            "follows the suffix (default: <store>/plots/<sweep>/....png)."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title (default: '<sweep>: <metric>')."),
    xlabel: Optional[str] = typer.Option(None, "--xlabel", help="x-axis label (default: a readable name, e.g. "
                                         "lr -> 'learning rate η')."),
    ylabel: Optional[str] = typer.Option(None, "--ylabel", help="y-axis label (default: a readable name, e.g. "
                                         "width -> 'width (units per layer)')."),
    cmap: str = typer.Option("viridis", "--cmap", help="matplotlib colour map (numeric metrics)."),
    vmin: Optional[float] = typer.Option(None, "--vmin", help="Lower end of the colour scale (default: the "
                                         "smallest value)."),
    vmax: Optional[float] = typer.Option(None, "--vmax", help="Upper end of the colour scale (default: the "
                                         "largest value)."),
    log_color: Optional[bool] = typer.Option(None, "--log-color/--linear-color", help="Log or linear colour "
                                             "scale (default: log when the values are positive and span more "
                                             "than 100x).", show_default=False),
    spread: Optional[str] = typer.Option(None, "--spread", help="iqr | minmax: add a row of panels with the "
                                         "spread of each cell's runs (seeds), and write median and low–high "
                                         "in the cells."),
    dpi: int = typer.Option(110, "--dpi", min=1, help="Resolution of PNG figures (dots per inch)."),
    store: Optional[str] = StoreOpt,
) -> None:
    """Draw a phase map: the metric's median over seeds on an x-by-y grid, diverged cells marked.

    A label column (--metric phase, after `raydyn analyze phase`) is drawn as a categorical map: the most frequent label per cell, its share, and boundaries between cells of different labels.
    """
    from raydyn.aggregate.maps import default_facets, phase_map_info, runs_with_metrics
    from raydyn.plots.maps import SPREADS, draw_phase_map
    from raydyn.plots.labels import figure_format

    if out_path is not None:
        figure_format(out_path)  # a bad suffix is refused before anything is read
    if spread is not None and spread not in SPREADS:
        raise RaydynError(f"--spread {spread!r}: allowed values are {', '.join(SPREADS)}")
    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    runs = runs_with_metrics(st, spec.name)
    if runs.num_rows == 0:
        raise RaydynError(f"sweep {spec.name!r} has no runs in store {st.uri}; run `raydyn sweep run` first")
    facets = list(facet) if facet else default_facets(spec.axes(), x, y)
    _need_phase(runs, metric, spec.name)
    _check_map_metric(runs, metric, spec.axes())
    _check_map_axis(runs, "--x", x, spec.axes())
    _check_map_axis(runs, "--y", y, spec.axes())
    from raydyn.aggregate.categorical import category_map_info, is_categorical
    from raydyn.plots.maps import draw_category_map

    if is_categorical(runs, metric):  # labels (e.g. phase): most frequent per cell, boundaries drawn
        cinfo = category_map_info(runs, metric, x, y, facets)
        if out_path is None:
            local = st.local_path()
            base = Path(local) / "plots" / spec.name if local else Path("raydyn-plots") / spec.name
            out_path = base / f"phase_{metric}_{x}_{y}.png"
        numeric_only = [o for o, v in [("--cmap", cmap != "viridis"), ("--vmin", vmin is not None),
                                       ("--vmax", vmax is not None), ("--log-color/--linear-color", log_color is not None),
                                       ("--spread", spread is not None)] if v]
        if numeric_only:
            raise RaydynError(f"{', '.join(numeric_only)}: only for a numeric metric; {metric!r} is a label column, "
                              "drawn with one fixed colour per label")
        path = draw_category_map(cinfo, out_path, title=title or f"{spec.name}: {metric}", dpi=dpi, xlabel=xlabel,
                                 ylabel=ylabel)
        n_edges = int(cinfo.x_edges.sum() + cinfo.y_edges.sum())
        console.print(f"phase map: {len(cinfo.facet_values)} panel(s) of {len(cinfo.y_values)}×{len(cinfo.x_values)} "
                      f"cells, labels {', '.join(cinfo.categories)}; {n_edges} boundary segment(s), "
                      f"{int((cinfo.n_runs == 0).sum())} missing")
        out.print(f"wrote {path.resolve()}")
        out.print(f"store: {st.uri}")
        return
    info = phase_map_info(runs, metric, x, y, facets)
    if out_path is None:
        local = st.local_path()
        base = Path(local) / "plots" / spec.name if local else Path("raydyn-plots") / spec.name
        out_path = base / f"phase_{metric}_{x}_{y}.png"
    path = draw_phase_map(info, out_path, title=title or f"{spec.name}: {metric}", dpi=dpi, xlabel=xlabel,
                          ylabel=ylabel, cmap=cmap, vmin=vmin, vmax=vmax, log_color=log_color, spread=spread)
    n_missing = int((info.n_runs == 0).sum())
    n_div = int((info.diverged_frac >= 0.5).sum())
    n_stop = int(((info.stopped_frac > 0) & (info.stopped_frac + info.diverged_frac >= 1 - 1e-12)
                  & (info.n_runs > 0)).sum()) if info.stopped_frac is not None else 0
    console.print(f"phase map: {len(info.facet_values)} panel(s) of {len(info.y_values)}×{len(info.x_values)} cells, "
                  f"{n_div} diverged, " + (f"{n_stop} stopped early, " if n_stop else "") + f"{n_missing} missing")
    out.print(f"wrote {path.resolve()}")
    out.print(f"store: {st.uri}")


@app.command("curves")
def curves(
    sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
    metric: str = typer.Option("test_loss", "--metric", help="Column of the metrics table (logged per step)."),
    group_by: str = typer.Option("lr", "--group-by", help="Runs column whose values get one curve each."),
    facet: Optional[str] = typer.Option(None, "--facet", help="Runs column whose values get one panel each."),
    band: str = typer.Option("iqr", "--band", help="iqr | std | minmax | none: the band drawn around each curve."),
    log_y: bool = typer.Option(False, "--log-y", help="Log-scaled y axis."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title (default: '<sweep>: <metric> by "
                                        "<group>')."),
    dpi: int = typer.Option(110, "--dpi", min=1, help="Resolution of PNG figures (dots per inch)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Figure path: .png, .pdf or .svg, the format "
                                            "follows the suffix (default: <store>/plots/<sweep>/....png)."),
    store: Optional[str] = StoreOpt,
) -> None:
    """Draw a metric's curves over training steps: one line per value of --group-by, the median over the runs sharing it (seeds, and any column not grouped by), with a band over those runs; one panel per value of --facet.

    Bands: iqr (25-75 % quantiles), std (the line is then the mean, the band mean ± one standard deviation), minmax, none. Steps where a run's value is NaN or infinite (diverged) leave that run out of that step. The aggregation runs in DuckDB over the store's Parquet, so sweeps of 10^4 runs take seconds.

    Example: raydyn curves my-sweep --metric test_loss --group-by lr --facet width --log-y --out curves.pdf
    """
    from raydyn.aggregate.curves import band_columns, curve_table
    from raydyn.plots.curves import draw_curves
    from raydyn.plots.labels import figure_format, readable

    if out_path is not None:
        figure_format(out_path)
    band_columns(band)
    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    table = curve_table(st, spec.name, metric, group_by, facet, band)
    if out_path is None:
        local = st.local_path()
        base = Path(local) / "plots" / spec.name if local else Path("raydyn-plots") / spec.name
        out_path = base / (f"curves_{metric}_{group_by}" + (f"_{facet}" if facet else "") + ".png")
    meta = table.schema.metadata
    path = draw_curves(table, out_path, dpi=dpi, log_y=log_y,
                       title=title or f"{spec.name}: {readable(metric)} by {readable(meta[b'raydyn.group_by'].decode())}")
    n_groups = len(set(table.column("group").to_pylist()))
    n_facets = len(set(table.column("facet").to_pylist()))
    console.print(f"curves: {n_groups} group(s) of {group_by} in {n_facets} panel(s), {table.num_rows} (group, step) "
                  "points", highlight=False)
    out.print(f"wrote {path.resolve()}")
    out.print(f"store: {st.uri}")


def _need_phase(runs, metric: str, sweep: str) -> None:
    if metric == "phase" and "phase" not in runs.column_names:
        raise RaydynError(f"sweep {sweep!r} has no phase labels yet: run `raydyn analyze phase {sweep}` first")


# runs columns that identify or describe a run rather than measure it: never a map metric
_NOT_METRICS = frozenset({"run_id", "population", "sweep", "config_json", "weights_layout", "versions", "record"})
_MAX_LABELS = 10  # a label column (e.g. phase) has at most this many distinct labels


def _axis_columns(runs, axes) -> list[str]:
    """The swept axes (but seed) that are runs columns with more than one value."""
    from raydyn.spec import column_name

    cols = [column_name(a) for a in axes if a != "seed"]
    return [c for c in dict.fromkeys(cols) if c in runs.column_names and len(set(runs.column(c).to_pylist())) > 1]


def _map_metrics(runs, axes) -> list[str]:
    """Columns a phase map can show: numeric columns and label columns (few distinct strings), not the axes."""
    import pyarrow as pa

    skip = set(_NOT_METRICS) | set(_axis_columns(runs, axes)) | {"seed"}
    ok = []
    for f in runs.schema:
        if f.name in skip:
            continue
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            ok.append(f.name)
        elif (pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)) \
                and len(set(runs.column(f.name).drop_null().to_pylist())) <= _MAX_LABELS:
            ok.append(f.name)
    return sorted(ok)


def _check_map_metric(runs, metric: str, axes) -> None:
    """RaydynError unless ``metric`` is a numeric or label column of the runs (naming the usable ones)."""
    import pyarrow as pa

    usable = _map_metrics(runs, axes)
    hint = f"; usable metrics: {', '.join(usable)}" if usable else ""
    if metric not in runs.column_names:
        raise RaydynError(f"--metric {metric!r} is not a column of the runs table or of an analysis summary{hint}")
    if metric in usable:
        return
    t = runs.schema.field(metric).type
    n = len(set(runs.column(metric).drop_null().to_pylist()))
    if metric in _NOT_METRICS:
        why = "identifies or describes runs; it is not a metric"
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        why = (f"is a text column with {n} distinct values: neither numeric nor a label column such as phase "
               f"(at most {_MAX_LABELS} labels)")
    elif metric in _axis_columns(runs, axes) or metric == "seed":
        why = "is a swept axis, not a metric"
    else:
        why = f"is a {t} column, neither numeric nor a label column"
    raise RaydynError(f"--metric {metric!r} {why}{hint}")


def _check_map_axis(runs, role: str, name: str, axes) -> None:
    """RaydynError unless ``name`` is a runs column that takes more than one value (naming the swept axes).

    A sweep with fewer than two swept axes may put a one-value column (e.g. seed) on an axis: a strip."""
    from raydyn.spec import column_name

    col = name if name in runs.column_names else column_name(name)
    swept = _axis_columns(runs, axes)
    hint = f"; swept axes: {', '.join(swept)}" if swept else " (the sweep has no axis with more than one value)"
    if col not in runs.column_names:
        raise RaydynError(f"{role} {name!r} is not a column of the runs table{hint}")
    values = set(runs.column(col).to_pylist())
    if len(values) <= 1 and len(swept) >= 2:
        only = f"every run has {col} = {next(iter(values))!r}" if values else f"{col} has no values"
        raise RaydynError(f"{role} {name!r} was not swept: {only}{hint}")


@app.command("phase-boundary")
def phase_boundary(
    sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
    axis: str = typer.Option("lr", "--axis", help="Numeric swept parameter to locate boundaries along."),
    metric: str = typer.Option("phase", "--metric", help="Label column (default phase, from `raydyn analyze "
                               "phase`), or with --level a numeric column."),
    level: Optional[float] = typer.Option(None, "--level", help="Locate where the numeric --metric crosses this "
                                          "value instead: the median over seeds per axis value, linearly "
                                          "interpolated between neighbouring values (in log space on a log axis)."),
    by: list[str] = typer.Option(None, "--by", help="Report separately per value of this column (repeatable). "
                                 "Default: every other swept axis except seed."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    store: Optional[str] = StoreOpt,
) -> None:
    """Where each phase boundary lies along an axis, with an uncertainty interval.

    Seeds at one axis value are replicates: the majority label counts, and a value where seeds disagree widens the interval to the next value outward.

    With --level X the metric is numeric: each place where its median over seeds crosses X between neighbouring axis values is reported, linearly interpolated.
    """
    import pyarrow as pa

    from raydyn.aggregate.categorical import boundaries_along
    from raydyn.aggregate.maps import runs_with_metrics
    from raydyn.spec import column_name

    if fmt not in ("table", "csv", "json"):
        raise RaydynError(f"--format {fmt!r}: allowed values are table, csv, json")
    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    runs = runs_with_metrics(st, spec.name)
    if runs.num_rows == 0:
        raise RaydynError(f"sweep {spec.name!r} has no runs in store {st.uri}; run `raydyn sweep run` first")
    _need_phase(runs, metric, spec.name)
    cols = set(runs.column_names)
    axis = axis if axis in cols else column_name(axis)
    groups = list(by) if by else [column_name(a) for a in spec.axes() if column_name(a) not in (axis, "seed")]
    if level is not None:
        _print_crossings(spec.name, runs, metric, axis, level, groups, fmt)
        return
    if metric in cols and pa.types.is_floating(runs.schema.field(metric).type):
        raise RaydynError(f"--metric {metric!r} is a numeric column, not labels: phase boundaries need a label column "
                          f"such as phase (`raydyn analyze phase {spec.name}` writes it); to find where {metric} "
                          f"crosses a value X along {axis}, give --level X")
    res = boundaries_along(runs, metric, axis, by=groups)
    _print_along(res, "boundaries", groups, fmt, ["left_phase", "right_phase", "location", "lower", "upper"],
                 f"{spec.name}: {metric} boundaries along {axis}",
                 ["boundary", "location", "interval", "seeds agreeing (left/right)"],
                 lambda b: [f"{b.left_phase} → {b.right_phase}", f"{b.location:.4g}", f"[{b.lower:.4g}, {b.upper:.4g}]",
                            f"{b.left_fraction:.0%} / {b.right_fraction:.0%}"])


def _print_along(res: list, items: str, groups: list[str], fmt: str, csv_columns: list[str], title: str,
                 headers: list[str], cells) -> None:
    """`phase-boundary`'s output, for boundaries and for --level crossings alike: per group (``res``, each with
    ``group``, ``n_points``, ``n_runs``, ``rows()`` and a list attribute ``items``) as JSON, CSV (``csv_columns``
    after the group columns when there are no rows) or a table with ``headers`` and ``cells(item)``."""
    rows = [r for g in res for r in g.rows()]
    if fmt == "json":
        sys.stdout.write(json.dumps([{"group": g.group, "points": g.n_points, "runs": g.n_runs,
                                      items: g.rows()} for g in res], indent=1, default=str) + "\n")
        return
    if fmt == "csv":
        _write_csv(rows, groups + csv_columns)
        return
    from rich.table import Table

    t = Table(title=title)
    for c in [*groups, *headers, "points"]:
        t.add_column(c)
    for g in res:
        found = getattr(g, items)
        if not found:
            t.add_row(*[str(g.group[c]) for c in groups], "(none)", *["–"] * (len(headers) - 1), str(g.n_points))
        for item in found:
            t.add_row(*[str(g.group[c]) for c in groups], *cells(item), str(g.n_points))
    out.print(t)


def _write_csv(rows: list[dict], columns: list[str]) -> None:
    """Rows (dicts) as CSV on stdout; ``columns`` when there are none (a header still tells what would be there)."""
    import csv

    w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else columns)
    w.writeheader()
    w.writerows(rows)


def _print_crossings(sweep: str, runs, metric: str, axis: str, level: float, groups: list[str], fmt: str) -> None:
    """`phase-boundary --level`: where the numeric metric crosses ``level`` along ``axis``, per group."""
    from raydyn.aggregate.levels import level_crossings

    res = level_crossings(runs, metric, axis, level, by=groups)
    _print_along(res, "crossings", groups, fmt,
                 ["level", "direction", "location", "lower", "upper", "lower_median", "upper_median"],
                 f"{sweep}: where the median {metric} crosses {level:g} along {axis}",
                 ["crossing", "location", "between", "medians"],
                 lambda c: [f"{c.direction} through {level:g}", f"{c.location:.4g}", f"[{c.lower:.4g}, {c.upper:.4g}]",
                            f"{c.lower_median:.4g} → {c.upper_median:.4g}"])


@sweep_app.command("refine")
def sweep_refine(
    sweep: str = typer.Argument(..., help="Sweep file or sweep name in the store (a grid sweep already run)."),
    budget: int = typer.Option(..., "--budget", help="Most new runs to train (each new axis value costs one run "
                               "per seed)."),
    axis: str = typer.Option("lr", "--axis", help="Swept numeric parameter to refine along."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Target boundary interval: absolute on a linear axis, "
                                        "relative (upper/lower - 1) on a log axis. Default: 1% of the range / 0.05."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Axis values proposed per round (default: cluster "
                                        "CPUs, at least 2)."),
    scale: str = typer.Option("auto", "--scale", help="auto | linear | log"),
    store: Optional[str] = StoreOpt,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, "
                                          "else an embedded local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for the embedded local Ray."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Add runs where the phase label changes between neighbouring values of an axis, until each boundary is within --tol or the budget is spent; prints the boundaries.

    Runs are labelled by `raydyn analyze phase` (run automatically when labels are missing) and the new runs are trained like `sweep run`, as runs of the same sweep (runs column origin = refine).
    """
    from raydyn.refine import refine_sweep

    st = _store(store)
    spec, text = _resolve_sweep(sweep, st)

    def on_round(i: int, points: list[dict[str, Any]]) -> None:
        vals = ", ".join(f"{p[axis]:.4g}" if isinstance(p[axis], float) else str(p[axis]) for p in points)
        console.print(f"round {i}: training {axis} = {vals}", highlight=False)

    log = _route_ray_log(st, spec.name)
    outcome = refine_sweep(spec, text, st, axis=axis, budget=budget, tol=tol, batch=batch, scale=scale,
                           address=address, num_cpus=num_cpus, on_round=on_round)
    if as_json:
        out.print_json(json.dumps({
            "axis": axis, "tol": outcome.tol, "log": outcome.log, "resolved": outcome.resolved,
            "grid_runs": outcome.grid_runs, "refine_runs": outcome.refine_runs, "dense_runs": outcome.dense_runs,
            "rounds": outcome.rounds, "boundaries": [{"group": g.group, "boundaries": g.rows()} for g in outcome.boundaries],
        }, default=str))
    else:
        for g in outcome.boundaries:
            head = ", ".join(f"{k}={v}" for k, v in g.group.items())
            for b in g.boundaries:
                out.print(f"{head + ': ' if head else ''}{b.left_phase} → {b.right_phase} at {axis} = {b.location:.4g} "
                          f"[{b.lower:.4g}, {b.upper:.4g}]", highlight=False)
            if not g.boundaries:
                out.print(f"{head + ': ' if head else ''}no boundary along {axis}", highlight=False)
        unit = "relative" if outcome.log else "absolute"
        out.print(f"{outcome.grid_runs} grid runs + {outcome.refine_runs} refined runs "
                  f"(a uniform grid at this resolution: {outcome.dense_runs} runs); tol {outcome.tol:g} ({unit}): "
                  + ("all boundaries resolved" if outcome.resolved else "not all boundaries resolved"), highlight=False)
    out.print(f"store: {st.uri}")
    if outcome.failed_populations:
        _print_failures(outcome, log)
        raise typer.Exit(1)


# ------------------------------------------------------------------------------ report
@app.command("report")
def report(
    sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
    metric: list[str] = typer.Option(None, "--metric", help="Metric to map (repeatable; default final_test_loss, "
                                     "final_test_acc and every analysis metric present)."),
    x: Optional[str] = typer.Option(None, "--x", help="x axis (default: first swept parameter)."),
    y: Optional[str] = typer.Option(None, "--y", help="y axis (default: second swept parameter)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="HTML path (default: <store>/reports/<sweep>.html)."),
    store: Optional[str] = StoreOpt,
) -> None:
    """Write one self-contained HTML page: phase maps, interactive curves (median and band per group, any swept axis), the run table with an overlay of the runs you click, and the analyses."""
    from raydyn.aggregate.maps import runs_with_metrics
    from raydyn.report import build_report

    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    metrics = list(metric) if metric else None
    runs = runs_with_metrics(st, spec.name)
    if runs.num_rows:  # metrics and axes asked for by name must exist (no runs: build_report says so)
        for m in metrics or ():
            _need_phase(runs, m, spec.name)
            _check_map_metric(runs, m, spec.axes())
        for role, a in (("--x", x), ("--y", y)):
            if a:
                _check_map_axis(runs, role, a, spec.axes())
    if metrics is None:
        cols = runs.column_names
        metrics = ["phase"] * ("phase" in cols) + ["final_test_loss", "final_test_acc"] + [c for c in cols if c.startswith(
            ("koopman_", "hmm_", "cmd_", "sym_", "opt_", "basin_", "convergence")) and c != "koopman_group"]
    if out_path is None:
        local = st.local_path()
        out_path = (Path(local) / "reports" if local else Path("raydyn-reports")) / f"{spec.name}.html"
    path = build_report(st, spec.name, out_path, metrics=metrics, x=x, y=y, axes=spec.axes())
    out.print(f"wrote {path.resolve()}")


# ------------------------------------------------------------------------------ analyze
def run_analysis(job, sweep: str, store: str | None, address: str | None, tag: str = "main") -> None:
    """Shared by every `raydyn analyze <name>` command: fan out, show progress, print what was written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raydyn.jobs import run_job
    from raydyn.sweep import ensure_ray

    st = _store(store)
    spec, _ = _resolve_sweep(sweep, st)
    _route_ray_log(st, f"{spec.name}-{job.name}")
    ensure_ray(address)
    with Progress(TextColumn(f"[bold]{job.name}[/] {spec.name}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("units · {task.fields[failed]} failed"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(job.name, total=None, failed=0)
        outcome = run_job(job, st, spec.name, tag=tag,
                          progress=lambda done, total, failed: bar.update(task, completed=done, total=total,
                                                                         failed=failed))
    for name, n in sorted(outcome.tables.items()):
        out.print(f"wrote {name}: {n} rows (sweep={spec.name})")
    out.print(f"store: {st.uri}")
    if outcome.failed:
        for key, err in list(outcome.failed.items())[:10]:
            console.print(f"[red]failed[/] {key}: {err.splitlines()[0]}", highlight=False)
        console.print(f"{len(outcome.failed)} of {outcome.units} units failed; the others' results were written.")
        raise typer.Exit(1)


def _analysis_command(a):
    """The click command ``raydyn analyze <a.name>``: a ``sweep`` argument, one option per CLI field of the
    analysis' options dataclass (type, default and help from the field), ``--store`` and ``--address``."""
    import dataclasses
    import inspect

    from rich.markup import escape

    from raydyn.jobs.options import cli_flag, comma_list, is_sequence, option_spec, option_types

    types = option_types(a.options)
    fields = [f for f in dataclasses.fields(a.options) if option_spec(f).cli]
    parsers: dict[str, Any] = {}
    P = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("sweep", P, annotation=str, default=typer.Argument(
        ..., help="Sweep name in the store, or its sweep file.", show_default=False))]
    for f in fields:
        spec, ann = option_spec(f), types[f.name]
        if spec.parse is not None or is_sequence(ann):  # given as a string, parsed into the field's value
            parsers[f.name] = spec.parse or comma_list
            ann, default = Optional[str], spec.cli_default
        else:
            default = f.default
        params.append(inspect.Parameter(f.name, P, annotation=ann, default=typer.Option(
            default, *cli_flag(f).split(" "), help=escape(spec.help), show_default=default is not None)))
    params += [inspect.Parameter("store", P, annotation=Optional[str], default=typer.Option(
                   None, "--store", help=STORE_HELP, show_default=False)),
               inspect.Parameter("address", P, annotation=Optional[str], default=typer.Option(
                   None, "--address", help="Ray cluster address (default: a local Ray).", show_default=False))]

    def command(**given: Any) -> None:
        sweep, store, address = given.pop("sweep"), given.pop("store"), given.pop("address")
        values = {}
        for name, v in given.items():
            if name in parsers:
                if v is None:
                    continue  # the field's default
                v = parsers[name](v)
            values[name] = v
        options = a.options(**values)
        after = a.after_fn()
        try:
            run_analysis(a.job(options), sweep, store, address)
        except typer.Exit:  # some units failed; the others' tables were written, so say what they hold
            if after is not None:
                _print_after(after, store, sweep, options)
            raise
        if after is not None:
            _print_after(after, store, sweep, options)

    summary, description = a.help_lines()
    command.__signature__ = inspect.Signature(params)
    command.__name__ = a.name.replace("-", "_")
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command(a.name, help=escape(summary + ("\n\n" + description if description else "")),
                short_help=escape(summary))(command)
    return typer.main.get_command(one)


def _print_after(after, store: str | None, sweep: str, options) -> None:
    st = _store(store)
    name = _resolve_sweep(sweep, st)[0].name
    for line in after(st, name, options) or ():
        out.print(line, highlight=False, markup=False)


# ------------------------------------------------------------------------------ import
@import_app.command("checkpoints")
def import_checkpoints_cmd(
    directory: Path = typer.Argument(..., help="Folder of torch.save checkpoints, one per step (step_000100.pt, or "
                                     "files holding {'step': ..., 'model': state_dict}).", show_default=False),
    sweep: str = typer.Option(..., "--sweep", help="Tracked sweep to file the run under (created if new).",
                              show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON mapping of the run's settings (lr, "
                                          "width, seed, ...): typed runs columns. With model: 'module:callable' the "
                                          "state dicts are loaded into that model (parameters and buffers told "
                                          "apart).", show_default=False),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="Metrics log: CSV with a header (a 'step' "
                                           "column) or JSON lines ({'step': ..., 'train_loss': ...}).",
                                           show_default=False),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (default: derived from sweep and config).",
                                         show_default=False),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Snapshot precision float32|float64 (default: the "
                                        "checkpoints' own).", show_default=False),
    store: Optional[str] = StoreOpt,
) -> None:
    """Import one run from a checkpoint folder into the weights table (and its metrics log into metrics).

    Checkpoints are loaded with torch.load(weights_only=True): a file that needs to unpickle arbitrary Python objects is refused, never loaded.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from raydyn.importers import import_checkpoints, read_config

    cfg = read_config(config)
    st = _store(store)
    with Progress(TextColumn(f"[bold]import[/] {directory}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("import", total=None)
        rid, n = import_checkpoints(st, directory, sweep=sweep, config=cfg, metrics=metrics, run_id=run_id,
                                    weights={"dtype": dtype} if dtype else None,
                                    progress=lambda i, total: bar.update(task, completed=i, total=total))
    out.print(f"imported run {rid} into sweep {sweep}: {n} snapshots"
              + (f", metrics from {metrics}" if metrics else "") + f" (store {st.uri})", highlight=False)


@import_app.command("tensorboard")
def import_tensorboard_cmd(
    logdir: Path = typer.Argument(..., help="TensorBoard log folder; every folder in it with event files is one run.",
                                  show_default=False),
    sweep: str = typer.Option(..., "--sweep", help="Tracked sweep to file the runs under (created if new).",
                              show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON mapping of settings shared by the "
                                          "runs; each run also gets 'run' (its folder).", show_default=False),
    store: Optional[str] = StoreOpt,
) -> None:
    """Import the scalars of TensorBoard event files into the metrics table (tags become columns: Loss/train -> loss_train). Needs the tensorboard package."""
    from raydyn.importers import import_tensorboard, read_config

    st = _store(store)
    ids = import_tensorboard(st, logdir, sweep=sweep, config=read_config(config))
    out.print(f"imported {len(ids)} run(s) into sweep {sweep} (store {st.uri}): {', '.join(ids[:5])}"
              + (" ..." if len(ids) > 5 else ""), highlight=False)


# ------------------------------------------------------------------------------ store
@store_app.command("check")
def store_check(
    store: Optional[str] = StoreOpt,
    repair: bool = typer.Option(False, "--repair", help="Move bad files and orphans into <store>/_quarantine/ "
                                "(never deletes)."),
) -> None:
    """Find unreadable or truncated Parquet files, runs without trajectories, trajectories without a run.

    Exit code 0 when the store is healthy (or was repaired), 1 when problems remain.
    """
    report = _store(store).check(repair=repair)
    out.print(report.summary(), highlight=False, markup=False)
    if not report.ok and not repair:
        raise typer.Exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it stops as on Ctrl-C."""


_stopped_by: list[int] = []  # the signals that stopped the command


def _on_signal(signum: int, frame: Any) -> None:
    import signal

    _stopped_by.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _redeliver_swallowed_stop(unraisable: Any) -> None:
    """``sys.unraisablehook`` of the CLI process. A signal that lands while Python runs a ``__del__`` (Ray's
    ``ActorHandle.__del__`` runs often during a sweep) raises there, where Python can only print the
    exception as "Exception ignored in ..." and drop it: the stop would be lost and a traceback printed.
    Such a stop is sent again from a short timer instead, so that it is raised where the program is."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _stopped_by:
        import os
        import threading

        signum = _stopped_by.pop()  # the handler appends it again when the signal is delivered
        timer = threading.Timer(0.01, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _install_stop_handlers() -> None:
    """SIGTERM, and SIGINT where the shell has not set it aside, stop the command as Ctrl-C does."""
    import signal

    global _previous_unraisablehook
    signal.signal(signal.SIGTERM, _on_signal)  # raydyn.sweep.ensure_ray keeps it across ray.init
    if sys.unraisablehook is not _redeliver_swallowed_stop:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _redeliver_swallowed_stop
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it
        signal.signal(signal.SIGINT, _on_signal)


def main() -> None:
    """Entry point: run the app, turning user errors into one clear message.

    Ctrl-C (SIGINT) and SIGTERM stop the same way: one message, exit code 128 + signal number.
    (Typer turns a KeyboardInterrupt into a return value, so the signal is remembered here.)
    """
    _install_stop_handlers()
    _show_warnings()
    try:
        rv = _run_app()
    except RaydynError as e:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:  # click usage errors come through here in non-standalone mode
        click = _click_exceptions()

        if isinstance(e, click.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.Abort):  # click turns KeyboardInterrupt into Abort
            _interrupted()
        raise
    if _stopped_by:
        _interrupted()
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer.Exit(code) comes back as a value
        sys.exit(rv)


def _run_app() -> Any:
    try:
        return app(standalone_mode=False)
    finally:  # Ray's log back to the terminal (matters when main() is called in-process, as in tests)
        if "raydyn.sweep" in sys.modules:
            sys.modules["raydyn.sweep"].unroute_ray_logs()


def _show_warnings() -> None:
    """raydyn's own warnings as one line each (``warning: ...``), not Python's file:line form."""
    import warnings

    from raydyn.errors import RaydynWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RaydynWarning):
            from rich.text import Text

            console.print(Text.assemble(("warning: ", "bold yellow"), str(message)), soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _click_exceptions():
    """The exception classes typer raises (typer >= 0.20 vendors its own copy of click)."""
    from types import SimpleNamespace

    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer: the real click
        from click.exceptions import ClickException
    return SimpleNamespace(Exit=typer.Exit, Abort=typer.Abort, ClickException=ClickException)


def _interrupted() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the message short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    console.print("interrupted. Completed runs are in the store; run the same command again to resume.")
    sys.exit(128 + (_stopped_by[0] if _stopped_by else signal.SIGINT))

if __name__ == "__main__":
    main()
