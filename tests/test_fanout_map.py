"""raydyn.fanout.map_tasks: submission order, batches of payloads per task, per-payload errors."""
from __future__ import annotations

import pytest


def _square(payload, shared):
    if payload == 7:
        raise ValueError("seven")
    return payload * payload + shared


@pytest.mark.ray
@pytest.mark.parametrize("kw", [{}, {"batch": 1}, {"batch": 3}, {"order": list(range(39, -1, -1))},
                                {"order": list(range(39, -1, -1)), "batch": 4, "max_in_flight": 2}])
def test_map_tasks_results_in_payload_order(ray_session, kw):
    from raydyn.fanout import map_tasks

    seen = []
    out = map_tasks(_square, list(range(40)), shared=1, progress=lambda d, t, f: seen.append((d, t, f)), **kw)
    assert [o.index for o in out] == list(range(40))
    assert [o.value for o in out if o.index != 7] == [i * i + 1 for i in range(40) if i != 7]
    assert out[7].value is None and out[7].error.startswith("ValueError: seven")
    assert all(o.error is None for o in out if o.index != 7)
    assert len(seen) == 40 and seen[-1] == (40, 40, 1)


@pytest.mark.ray
def test_map_tasks_checks_order_and_batch(ray_session):
    from raydyn.fanout import map_tasks

    with pytest.raises(ValueError, match="permutation"):
        map_tasks(_square, [1, 2, 3], shared=0, order=[0, 0, 1])
    with pytest.raises(ValueError, match="batch"):
        map_tasks(_square, [1, 2, 3], shared=0, batch=0)


def test_auto_batch():
    from raydyn.fanout import _BATCH_MAX, _BATCH_TARGET_S, _auto_batch

    assert _auto_batch(1000, 2, None) == 1  # no duration known yet
    assert _auto_batch(1000, 2, 2 * _BATCH_TARGET_S) == 1  # long payloads go one per task
    assert _auto_batch(1000, 2, _BATCH_TARGET_S / 5.5) == 5  # about _BATCH_TARGET_S a task
    assert _auto_batch(1000, 2, 1e-4) == _BATCH_MAX
    assert _auto_batch(40, 2, 1e-4) == 2  # the last eighth of the work goes one by one
    assert _auto_batch(15, 2, 1e-4) == 1
