"""Synthetic store contents with known answers, and backend-agnostic file surgery."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raydyn.store import Store

STATUSES = ("completed", "diverged", "failed")


def make_runs(run_ids: list[str], *, seed: int = 0, lr: list[float] | None = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(run_ids)
    return pa.table(
        {
            "run_id": pa.array(run_ids, pa.string()),
            "population": pa.array([f"pop{i % 2}" for i in range(n)], pa.string()),
            "status": pa.array([STATUSES[i % 3] for i in range(n)], pa.string()),
            "seed": pa.array(np.arange(n, dtype=np.int64) + 1000 * seed),
            "steps_done": pa.array(np.full(n, 50, dtype=np.int64)),
            "wall_time_s": pa.array(rng.uniform(1, 2, n)),
            "config_json": pa.array([json.dumps({"lr": 0.1 * (i + 1)}) for i in range(n)]),
            "weights_layout": pa.array([json.dumps({"w": [2, 2]})] * n),
            "versions": pa.array([json.dumps({"torch": "x"})] * n),
            "lr": pa.array(lr if lr is not None else [0.1 * (i + 1) for i in range(n)], pa.float64()),
            "width": pa.array(np.arange(n, dtype=np.int64) % 3 + 8),
            "optimizer": pa.array(["sgd" if i % 2 else "adam" for i in range(n)]),
            "nesterov": pa.array([bool(i % 2) for i in range(n)]),
            "final_loss": pa.array(rng.uniform(0, 1, n)),
        }
    )


def make_metrics(run_ids: list[str], steps: int = 5, *, seed: int = 0, extra: tuple[str, ...] = ()) -> pa.Table:
    rng = np.random.default_rng(seed)
    rid = np.repeat(np.array(run_ids, dtype=object), steps)
    step = np.tile(np.arange(steps, dtype=np.int64), len(run_ids))
    cols = {
        "run_id": pa.array(rid.tolist(), pa.string()),
        "step": pa.array(step),
        "loss": pa.array(rng.uniform(0, 1, rid.size)),
    }
    for name in extra:
        cols[name] = pa.array(rng.uniform(0, 1, rid.size))
    return pa.table(cols)


def make_weights(run_ids: list[str], steps: int = 3, dim: int = 4, *, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rid = np.repeat(np.array(run_ids, dtype=object), steps)
    step = np.tile(np.arange(steps, dtype=np.int64), len(run_ids))
    w = rng.standard_normal((rid.size, dim)).astype(np.float32)
    return pa.table(
        {
            "run_id": pa.array(rid.tolist(), pa.string()),
            "step": pa.array(step),
            "weights": pa.array(list(w), pa.list_(pa.float32())),
        }
    )


def sort(t: pa.Table, *keys: str) -> pa.Table:
    keys = keys or tuple(k for k in ("sweep", "run_id", "step") if k in t.column_names)
    return t.sort_by([(k, "ascending") for k in keys])


def files(store: Store) -> list[str]:
    """Every file under the root, relative, sorted."""
    sel = pafs.FileSelector(store.root, recursive=True, allow_not_found=True)
    out = []
    for info in store.filesystem.get_file_info(sel):
        if info.type == pafs.FileType.File:
            out.append(store._relpath(info.path))
    return sorted(out)


def read_bytes(store: Store, relpath: str) -> bytes:
    with store.filesystem.open_input_stream(store.path(relpath)) as f:
        return f.read()


def write_bytes(store: Store, relpath: str, data: bytes) -> None:
    store.filesystem.create_dir(store.path(relpath.rsplit("/", 1)[0]), recursive=True)
    with store.filesystem.open_output_stream(store.path(relpath)) as f:
        f.write(data)


class FailingMoveHandler(pafs.FileSystemHandler):
    """Delegates to a real filesystem but every move fails (a rename that never happens)."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner

    def get_type_name(self):
        return "failing-move"

    def move(self, src, dest):
        raise OSError("disk full (simulated)")

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):  # pragma: no cover - never called
        raise OSError("refusing to delete a root")

    def delete_file(self, path):
        self.inner.delete_file(path)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):  # pragma: no cover - never called
        return self.inner.open_append_stream(path, metadata=metadata)

    def normalize_path(self, path):
        return self.inner.normalize_path(path)
