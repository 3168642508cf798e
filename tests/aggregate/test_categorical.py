"""Categorical phase maps and boundaries along an axis, on constructed runs tables (numbers, then a PNG)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raydyn.errors import RaydynError
from raydyn.aggregate.categorical import boundaries_along, category_map_info, is_categorical
from raydyn.aggregate.maps import phase_map_info
from raydyn.plots.maps import draw_category_map


def table(rows):
    return pa.Table.from_pylist(rows)


def grid_runs():
    """lr in {0.1, 0.2, 0.4, 0.8} x width in {8, 16} x depth in {1, 2} x 3 seeds, with planted phases.

    depth 1: lazy for lr <= 0.2, catapult at 0.4, diverged at 0.8 -- except width 16 at lr 0.4, where
    2 of 3 seeds catapult and one is lazy. depth 2: the cell (lr 0.8, width 16) has no runs, and
    (lr 0.1, width 8) has one unlabelled run (not classified yet) besides its labelled ones.
    """
    rows = []
    for depth in (1, 2):
        for width in (8, 16):
            for lr in (0.1, 0.2, 0.4, 0.8):
                if depth == 2 and width == 16 and lr == 0.8:
                    continue
                for seed in range(3):
                    phase = "lazy" if lr <= 0.2 else ("catapult" if lr == 0.4 else "diverged")
                    if depth == 1 and width == 16 and lr == 0.4 and seed == 2:
                        phase = "lazy"
                    rows.append(dict(run_id=f"r{depth}{width}{lr}{seed}", lr=lr, width=width, depth=depth, seed=seed,
                                     status="diverged" if phase == "diverged" else "completed", phase=phase,
                                     final_test_loss=float(lr)))
                if depth == 2 and width == 8 and lr == 0.1:
                    rows.append(dict(run_id="unlabelled", lr=lr, width=width, depth=depth, seed=9, status="completed",
                                     phase=None, final_test_loss=0.1))
    return table(rows)


def test_majority_label_share_and_counts_per_cell_with_facets():
    runs = grid_runs()
    assert is_categorical(runs, "phase") and not is_categorical(runs, "lr")
    info = category_map_info(runs, "phase", "lr", "width", ["depth"])
    assert info.facet_values == [(1,), (2,)] and info.x_values == [0.1, 0.2, 0.4, 0.8] and info.y_values == [8, 16]
    assert info.categories == ["lazy", "catapult", "diverged"]  # PHASES order, only those present
    assert info.label.shape == (2, 2, 4)
    assert list(info.label[0, 0]) == ["lazy", "lazy", "catapult", "diverged"]
    assert info.label[0, 1, 2] == "catapult" and info.fraction[0, 1, 2] == pytest.approx(2 / 3)
    assert list(info.counts[0, 1, 2]) == [1, 2, 0]
    assert np.nanmin(np.delete(info.fraction[0].ravel(), 6)) == 1.0  # every other depth-1 cell is unanimous
    assert info.n_runs[1, 0, 0] == 3  # the unlabelled run is not counted
    assert info.x_log  # 0.1 .. 0.8 with constant ratio


def test_missing_cells_are_missing_not_a_category():
    info = category_map_info(grid_runs(), "phase", "lr", "width", ["depth"])
    assert info.label[1, 1, 3] is None and np.isnan(info.fraction[1, 1, 3]) and info.n_runs[1, 1, 3] == 0
    assert "None" not in info.categories and info.counts[1, 1, 3].sum() == 0
    # no boundary is drawn against a missing cell
    assert not info.x_edges[1, 1, 2]


def test_boundaries_between_cells_of_different_phase():
    info = category_map_info(grid_runs(), "phase", "lr", "width", ["depth"])
    # along lr: lazy|catapult between 0.2 and 0.4, catapult|diverged between 0.4 and 0.8
    assert info.x_edges[0].tolist() == [[False, True, True], [False, True, True]]
    assert info.x_edges[1].tolist() == [[False, True, True], [False, True, False]]
    # along width: every column has the same majority in both rows -> no horizontal boundary
    assert not info.y_edges.any()


def test_numeric_maps_still_aggregate_medians():
    info = phase_map_info(grid_runs(), "final_test_loss", "lr", "width", ["depth"])
    assert np.isnan(info.median[1, 1, 3]) and info.n_runs[1, 1, 3] == 0


def test_boundaries_along_an_axis_per_group_with_uncertainty():
    runs = grid_runs()
    res = boundaries_along(runs, "phase", "lr", by=["depth", "width"])
    assert [r.group for r in res] == [{"depth": 1, "width": 8}, {"depth": 1, "width": 16},
                                      {"depth": 2, "width": 8}, {"depth": 2, "width": 16}]
    b = res[0].boundaries
    assert [(x.left_phase, x.right_phase) for x in b] == [("lazy", "catapult"), ("catapult", "diverged")]
    assert b[0].lower == 0.2 and b[0].upper == 0.4 and b[0].location == pytest.approx(np.sqrt(0.2 * 0.4))
    # width 16, depth 1: the 2-of-3 catapult point widens both intervals outward
    w = res[1].boundaries
    assert w[0].right_fraction == pytest.approx(2 / 3) and w[0].upper == 0.8 and w[0].widened
    assert res[3].n_points == 3 and [(x.left_phase, x.right_phase) for x in res[3].boundaries] == [("lazy", "catapult")]
    rows = res[0].rows()
    assert rows[0]["depth"] == 1 and rows[0]["width"] == 8 and rows[0]["interval_width"] == pytest.approx(0.2)


def test_boundaries_along_pools_groups_not_named_in_by():
    res = boundaries_along(grid_runs(), "phase", "lr")
    (only,) = res
    assert only.group == {} and only.n_points == 4
    assert [(b.left_phase, b.right_phase) for b in only.boundaries] == [("lazy", "catapult"), ("catapult", "diverged")]


def test_errors_name_the_column():
    runs = grid_runs()
    with pytest.raises(RaydynError, match="--metric 'phas' is not a column"):
        category_map_info(runs, "phas", "lr", "width")
    with pytest.raises(RaydynError, match="--by 'lr' is the axis itself"):
        boundaries_along(runs, "phase", "lr", by=["lr"])
    with pytest.raises(RaydynError, match="--axis 'status' must be numeric"):
        boundaries_along(runs, "phase", "status")


def test_drawing_writes_a_png(tmp_path):
    info = category_map_info(grid_runs(), "phase", "lr", "width", ["depth"])
    path = draw_category_map(info, tmp_path / "m.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
