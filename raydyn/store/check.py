"""Store integrity: find unreadable files, orphans, duplicates and stale tmp files; quarantine them.

What counts as a problem (all scoped to one sweep):

- **unreadable file** -- a ``part-*.parquet`` that cannot be read completely
  (bad footer, truncated, damaged page: every row group is decoded with page
  checksums verified), or a ``sweep.json`` that is not a JSON object, or a
  ``sweep.yaml`` that is not UTF-8.
- **orphan run** -- a runs row (status ``completed``, ``diverged`` or ``stopped``) whose
  run_id has no metrics rows in the sweep. Runs with status ``failed`` may
  legitimately have none and are not orphans.
- **orphan trajectory** -- metrics or weights rows whose run_id has no runs
  row in the sweep (e.g. the writer crashed after the metrics part and
  before the runs part: :meth:`Store.write_runs` writes runs last).
- **duplicate run** -- a run_id with more than one runs row in the sweep.
- **stray tmp file** -- a ``.tmp-*`` file older than ``stale_tmp_minutes``
  (a writer died between writing and renaming).

Repair (``repair=True``) never deletes. It moves files to
``_quarantine/<UTC timestamp>/<original relative path>``, which readers do not
see, in this order (runs before trajectories, mirroring the commit order):

1. unreadable files and stray tmp files are moved to the quarantine;
2. orphan runs are removed from the runs table: a runs part whose rows are all
   orphans is moved; a part that also holds healthy runs is **copied** to the
   quarantine and rewritten (atomically) without the orphan rows;
3. metrics/weights rows whose run_id is no longer a run of the sweep (the
   orphan trajectories, plus the trajectories of the runs removed in step 2)
   are removed the same way: whole part moved, or part copied and rewritten.

Orphan detection runs over the readable files only, so a quarantined metrics
part turns its runs into orphan runs, and step 2 removes them: the store is
left consistent, and a resume (``completed_run_ids``) re-runs them.
Duplicate runs are reported, not repaired (which copy is right is the
caller's call). ``CheckReport.actions`` lists every move and rewrite.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydyn.store import layout
from raydyn.store.schema import FINISHED_STATUSES

if TYPE_CHECKING:  # pragma: no cover
    from raydyn.store.store import Store

_ERRORS = (OSError, pa.ArrowException)
_TRAJECTORY_TABLES = ("metrics", "weights")


@dataclass(frozen=True)
class UnreadableFile:
    relpath: str
    reason: str


@dataclass(frozen=True)
class OrphanRun:
    sweep: str
    run_id: str
    relpath: str


@dataclass(frozen=True)
class OrphanTrajectory:
    table: str
    sweep: str
    run_id: str
    relpath: str
    rows: int


@dataclass(frozen=True)
class DuplicateRun:
    sweep: str
    run_id: str
    relpaths: tuple[str, ...]


@dataclass(frozen=True)
class StrayTmp:
    relpath: str
    age_s: float


@dataclass
class CheckReport:
    """What :meth:`Store.check` found (before any repair) and, if repairing, what it did.

    Paths are relative to the store root (``location``). ``ok`` describes the
    store as found; after ``repair=True`` run ``check()`` again to confirm.
    """

    location: str
    unreadable: list[UnreadableFile] = field(default_factory=list)
    orphan_runs: list[OrphanRun] = field(default_factory=list)
    orphan_trajectories: list[OrphanTrajectory] = field(default_factory=list)
    duplicate_runs: list[DuplicateRun] = field(default_factory=list)
    stray_tmp: list[StrayTmp] = field(default_factory=list)
    #: (sweep, run_id) of tracked runs with committed records but no runs row yet: still logging, or
    #: interrupted (``raydyn.track(..., resume=True)`` finishes them). Not a problem, never repaired.
    in_progress: list[tuple[str, str]] = field(default_factory=list)
    files_checked: int = 0
    repaired: bool = False
    quarantine: str | None = None
    actions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unreadable or self.orphan_runs or self.orphan_trajectories or self.duplicate_runs or self.stray_tmp)

    def summary(self) -> str:
        lines = [
            f"store {self.location}: {self.files_checked} data file(s) checked, "
            + ("OK" if self.ok else "PROBLEMS FOUND")
        ]
        for u in self.unreadable:
            lines.append(f"  unreadable file {u.relpath}: {u.reason}")
        for r in self.orphan_runs:
            lines.append(f"  orphan run {r.run_id!r} (sweep {r.sweep!r}) in {r.relpath}: no metrics rows")
        for o in self.orphan_trajectories:
            lines.append(
                f"  orphan trajectory: {o.rows} {o.table} row(s) of run {o.run_id!r} (sweep {o.sweep!r}) "
                f"in {o.relpath}: no runs row"
            )
        for d in self.duplicate_runs:
            lines.append(f"  duplicate run {d.run_id!r} (sweep {d.sweep!r}) in {', '.join(d.relpaths)} (not repaired)")
        for t in self.stray_tmp:
            lines.append(f"  stray tmp file {t.relpath} ({t.age_s / 60:.1f} min old)")
        for sweep, rid in self.in_progress:
            lines.append(f"  tracked run {rid!r} (sweep {sweep!r}) in progress or interrupted: no runs row yet "
                         "(raydyn.track(..., resume=True) finishes it; not a problem)")
        if self.repaired:
            if self.actions:
                lines.append(f"repair: quarantine {self.quarantine}")
                lines += [f"  {a}" for a in self.actions]
            else:
                lines.append("repair: nothing to do")
        elif not self.ok:
            lines.append("run check(repair=True) to quarantine the bad files and rows (nothing is deleted)")
        return "\n".join(lines)

    __str__ = summary


@dataclass
class _FileIds:
    """run_id row counts of one readable part (and statuses, for runs)."""

    counts: dict[str, int]
    statuses: dict[str, list[str]]


def _scan_part(store: Store, relpath: str, table: str) -> _FileIds:
    """Decode every row group (page checksums on); return the run_id counts."""
    counts: dict[str, int] = defaultdict(int)
    statuses: dict[str, list[str]] = defaultdict(list)
    with store.filesystem.open_input_file(store.path(relpath)) as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        rows = 0
        for i in range(pf.num_row_groups):
            rg = pf.read_row_group(i)
            rows += rg.num_rows
            if "run_id" in rg.column_names:
                ids = rg.column("run_id").to_pylist()
                sts = rg.column("status").to_pylist() if table == "runs" and "status" in rg.column_names else None
                for j, rid in enumerate(ids):
                    counts[str(rid)] += 1
                    if sts is not None:
                        statuses[str(rid)].append(str(sts[j]))
        if rows != pf.metadata.num_rows:
            raise OSError(f"decoded {rows} rows but the footer promises {pf.metadata.num_rows}")
    return _FileIds(dict(counts), dict(statuses))


def _check_meta_file(store: Store, relpath: str) -> str | None:
    raw = store._read_small(relpath)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
        if relpath.endswith(layout.SWEEP_JSON) and not isinstance(json.loads(text), dict):
            return "not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return str(e)
    return None


def check_store(store: Store, *, repair: bool = False, stale_tmp_minutes: float = 60.0) -> CheckReport:
    report = CheckReport(location=store.location())
    if not store.exists():
        return report
    now_ns = time.time_ns()
    infos = store._list_files("", recursive=True)
    # ids[sweep][table][relpath] -> _FileIds
    ids: dict[str, dict[str, dict[str, _FileIds]]] = defaultdict(lambda: defaultdict(dict))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = store._relpath(info.path)
        if rel.startswith(layout.QUARANTINE_DIR + "/"):
            continue
        fname = rel.rsplit("/", 1)[-1]
        if layout.is_tmp_name(fname):
            age_s = max(0.0, (now_ns - (info.mtime_ns or now_ns)) / 1e9)
            if age_s >= stale_tmp_minutes * 60:
                report.stray_tmp.append(StrayTmp(rel, age_s))
            continue
        pieces = rel.split("/")
        if len(pieces) == 3 and pieces[0] == layout.SWEEPS_DIR and pieces[2] in (layout.SWEEP_JSON, layout.SWEEP_YAML):
            reason = _check_meta_file(store, rel)
            if reason is not None:
                report.unreadable.append(UnreadableFile(rel, reason))
            continue
        pp = layout.parse_relpath(rel)
        if pp is None:
            continue  # a foreign file: not ours to judge
        report.files_checked += 1
        try:
            ids[pp.sweep][pp.table][rel] = _scan_part(store, rel, pp.table)
        except _ERRORS as e:
            report.unreadable.append(UnreadableFile(rel, str(e) or type(e).__name__))

    drop: dict[str, set[str]] = defaultdict(set)  # relpath -> run_ids to remove on repair
    for sweep in sorted(ids):
        tables = ids[sweep]
        run_files: dict[str, list[str]] = defaultdict(list)
        run_status: dict[str, set[str]] = defaultdict(set)
        for rel, fid in tables.get("runs", {}).items():
            for rid, n in fid.counts.items():
                run_files[rid] += [rel] * n
                run_status[rid].update(fid.statuses.get(rid, []))
        with_metrics = {rid for fid in tables.get("metrics", {}).values() for rid in fid.counts}
        for rid in sorted(run_files):
            if len(run_files[rid]) > 1:
                report.duplicate_runs.append(DuplicateRun(sweep, rid, tuple(run_files[rid])))
        removed_runs: set[str] = set()
        for rid in sorted(run_files):
            if rid not in with_metrics and run_status[rid] & FINISHED_STATUSES:
                removed_runs.add(rid)
                for rel in dict.fromkeys(run_files[rid]):
                    report.orphan_runs.append(OrphanRun(sweep, rid, rel))
                    drop[rel].add(rid)
        surviving = set(run_files) - removed_runs
        # a tracked run writes its own parts (part-track-<run_id>-<n>) and its runs row only at the end
        tracked = (store.sweep_meta(sweep) or {}).get("kind") == "tracked"
        live = set()
        if tracked:
            for rel, fid in tables.get("metrics", {}).items():
                part = layout.parse_relpath(rel).part
                live |= {rid for rid in fid.counts if rid not in run_files and part.startswith(f"track-{rid}-")}
            report.in_progress += [(sweep, rid) for rid in sorted(live)]
        for table in _TRAJECTORY_TABLES:
            for rel, fid in sorted(tables.get(table, {}).items()):
                for rid, n in sorted(fid.counts.items()):
                    if rid in live and layout.parse_relpath(rel).part.startswith(f"track-{rid}-"):
                        continue
                    if rid not in run_files:
                        report.orphan_trajectories.append(OrphanTrajectory(table, sweep, rid, rel, n))
                    if rid not in surviving:
                        drop[rel].add(rid)

    if repair:
        report.repaired = True
        _repair(store, report, drop)
    return report


def _quarantine_dir(store: Store) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{layout.QUARANTINE_DIR}/{stamp}"
    candidate, n = base, 1
    while store.filesystem.get_file_info(store.path(candidate)).type != pafs.FileType.NotFound:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _repair(store: Store, report: CheckReport, drop: dict[str, set[str]]) -> None:
    fs = store.filesystem
    qdir: str | None = None

    def target(rel: str) -> str:
        nonlocal qdir
        if qdir is None:
            qdir = _quarantine_dir(store)
            report.quarantine = qdir
        dest = f"{qdir}/{rel}"
        fs.create_dir(store.path(dest.rsplit("/", 1)[0]), recursive=True)
        return dest

    def move(rel: str, why: str) -> None:
        dest = target(rel)
        fs.move(store.path(rel), store.path(dest))
        report.actions.append(f"moved {rel} -> {dest} ({why})")

    for u in report.unreadable:
        move(u.relpath, "unreadable")
    for t in report.stray_tmp:
        move(t.relpath, "stray tmp file")
    unreadable = {u.relpath for u in report.unreadable}
    # runs first, then trajectories: the commit order, so a crash mid-repair leaves detectable orphans.
    ordered = sorted(drop, key=lambda rel: (not rel.startswith("runs/"), rel))
    for rel in ordered:
        if rel in unreadable or not drop[rel]:
            continue
        with fs.open_input_file(store.path(rel)) as f:
            data = pq.ParquetFile(f).read()
        ids = sorted(drop[rel])
        keep = pc.invert(pc.is_in(data.column("run_id"), value_set=pa.array(ids, pa.string())))
        kept = data.filter(keep)
        what = f"run_id(s) {ids[:5]}{' ...' if len(ids) > 5 else ''}"
        if kept.num_rows == 0:
            move(rel, f"all rows orphaned: {what}")
        else:
            dest = target(rel)
            fs.copy_file(store.path(rel), store.path(dest))
            store._atomic_write_parquet(rel, kept)
            report.actions.append(
                f"rewrote {rel} without {data.num_rows - kept.num_rows} orphan row(s) of {what}; "
                f"original copied to {dest}"
            )
