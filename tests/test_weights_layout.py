"""WeightsLayout: ``runs.weights_layout`` as a typed record, written back to exactly the stored JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest

from raydyn.errors import StoreError
from raydyn.store.schema import RUN_LIBRARIES, SWEEP_LIBRARIES, WeightsLayout, library_versions
from raydyn.train.recorder import SKETCH_SEED, float_settings, weights_layout

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
SHAPES = [(16, 8), (16,), (3, 16), (3,)]

# the texts the recorder has always written into runs.weights_layout (json.dumps of its dict)
FULL = ('{"kind": "full", "names": ["0.weight", "0.bias", "2.weight", "2.bias"], "shapes": [[16, 8], [16], [3, 16], '
        '[3]], "offsets": [0, 128, 144, 192, 195], "dim": 195, "param_names": ["0.weight", "0.bias", "2.weight", '
        '"2.bias"]}')
LAYERS = ('{"kind": "layers", "names": ["2.weight", "2.bias"], "shapes": [[3, 16], [3]], "offsets": [0, 48, 51], '
          '"dim": 51, "param_names": ["0.weight", "0.bias", "2.weight", "2.bias"]}')
SKETCH = ('{"kind": "full+countsketch", "names": ["0.weight", "0.bias", "2.weight", "2.bias"], "shapes": [[16, 8], '
          '[16], [3, 16], [3]], "offsets": [0, 128, 144, 192, 195], "dim": 32, "param_names": ["0.weight", "0.bias", '
          f'"2.weight", "2.bias"], "source_dim": 195, "sketch_seed": {SKETCH_SEED}}}')


@pytest.mark.parametrize("wcfg, text", [({}, FULL), ({"layers": ["2."]}, LAYERS),
                                        ({"max_size": 100, "projection_dim": 32}, SKETCH)])
def test_recorder_layouts_round_trip_to_identical_json(wcfg, text):
    layout, sketch = weights_layout(NAMES, SHAPES, wcfg)
    assert isinstance(layout, WeightsLayout)
    assert layout.to_json() == text
    assert (sketch is not None) == ("countsketch" in text)
    parsed = WeightsLayout.from_json(text)
    assert parsed == layout and parsed.to_json() == text
    assert WeightsLayout.from_json(json.loads(text)).to_json() == text  # from the parsed dict
    assert WeightsLayout.from_json(text.encode()).to_json() == text  # from bytes
    assert WeightsLayout.from_json(parsed) is parsed
    assert parsed.to_dict() == json.loads(text)


def test_buffers_and_dtype_keep_the_writers_key_order():
    """The recorder adds buffer names/shapes after the layout; raydyn.track adds the dtype before them."""
    layout, _ = weights_layout(NAMES, SHAPES, {"max_size": 100, "projection_dim": 32})
    with_bufs = dataclasses.replace(layout, buffer_names=["1.running_mean"], buffer_shapes=[[16]])
    expected = {**json.loads(SKETCH), "buffer_names": ["1.running_mean"], "buffer_shapes": [[16]]}
    assert with_bufs.to_json() == json.dumps(expected)
    tracked = dataclasses.replace(dataclasses.replace(layout, dtype="float64"), buffer_names=["b"], buffer_shapes=[[2]])
    expected = {**json.loads(SKETCH), "dtype": "float64", "buffer_names": ["b"], "buffer_shapes": [[2]]}
    assert tracked.to_json() == json.dumps(expected)
    assert WeightsLayout.from_json(tracked.to_json()).to_json() == tracked.to_json()
    assert tracked.buffer_names == ("b",) and tracked.buffer_shapes == ((2,),) and tracked.dtype == "float64"


def test_any_stored_json_comes_back_as_it_was():
    """Unknown keys, another key order, nulls: kept (a tracked run resumed writes its stored layout back)."""
    for text in ['{"w": [2, 2]}', '{"dim": 3, "kind": "full", "names": ["a"], "offsets": [0, 3], "shapes": [[3]]}',
                 '{"kind": "none"}', '{"kind": "full", "dtype": null, "extra": {"a": [1, {"b": 2}]}}']:
        assert WeightsLayout.from_json(text).to_json() == text
    assert WeightsLayout.from_json('{"w": [2, 2]}').extra["w"] == (2, 2)
    assert WeightsLayout(kind="none").to_json() == '{"kind": "none"}'


def test_pickles_and_copies_to_the_same_json():
    """Layouts travel to Ray workers and into copies of a recorder."""
    import copy
    import pickle

    for text in (FULL, SKETCH, '{"w": [2, {"x": 1}], "kind": "full"}'):
        layout = WeightsLayout.from_json(text)
        for back in (pickle.loads(pickle.dumps(layout)), copy.deepcopy(layout)):
            assert back == layout and back.to_json() == text
    built, _ = weights_layout(NAMES, SHAPES, {})
    assert pickle.loads(pickle.dumps(built)).to_json() == FULL


@pytest.mark.parametrize("empty", [None, "", "{}", {}])
def test_no_layout(empty):
    layout = WeightsLayout.from_json(empty)
    assert layout == WeightsLayout() and layout.to_json() == "{}"
    assert layout.kind is None and layout.names is None and layout.dim is None and layout.dtype is None
    assert not layout.is_full and not layout.is_sketch


def test_not_an_object_is_refused():
    with pytest.raises(StoreError, match="weights_layout must be a JSON object"):
        WeightsLayout.from_json("[1, 2]")


def test_properties():
    full, layers, sketch = (WeightsLayout.from_json(t) for t in (FULL, LAYERS, SKETCH))
    assert full.is_full and not full.is_sketch
    assert not layers.is_full and not layers.is_sketch and layers.kind == "layers"
    assert sketch.is_sketch and not sketch.is_full
    assert full.dim == 195 and sketch.dim == 32 and sketch.source_dim == 195 and sketch.sketch_seed == SKETCH_SEED
    assert full.names == tuple(NAMES) and full.shapes == tuple(SHAPES) and full.offsets == (0, 128, 144, 192, 195)
    assert full.sizes == (128, 16, 48, 3) and layers.sizes == (48, 3)
    assert full.param_names == tuple(NAMES) and full.dtype is None
    # the JSON view: what code written against the parsed dict reads (lists, not tuples)
    assert full["names"] == NAMES and full["shapes"] == [list(s) for s in SHAPES]
    with pytest.raises(KeyError):
        full["buffer_names"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.kind = "layers"


def test_select_by_name_prefix():
    full = WeightsLayout.from_json(FULL)
    picked = full.select(["2."])
    assert [(p.index, p.name, p.shape, p.cols) for p in picked] == [
        (2, "2.weight", (3, 16), slice(144, 192)), (3, "2.bias", (3,), slice(192, 195))]
    assert [p.name for p in full.select(["0.b", "2.w"])] == ["0.bias", "2.weight"]
    assert [p.cols for p in full.select()] == [slice(0, 128), slice(128, 144), slice(144, 192), slice(192, 195)]
    assert full.select(["9."]) == []
    layers = WeightsLayout.from_json(LAYERS)  # columns of the stored subset, not of the whole model
    assert [(p.name, p.cols) for p in layers.select(["2.b"])] == [("2.bias", slice(48, 51))]
    with pytest.raises(StoreError, match="CountSketch of the parameters \\(195 values projected to 32"):
        WeightsLayout.from_json(SKETCH).select(["2."])
    with pytest.raises(StoreError, match="names no stored parameter tensors"):
        WeightsLayout(kind="none").select()


def test_one_version_helper_in_both_stored_forms():
    runs = library_versions()
    assert list(runs) == list(RUN_LIBRARIES) and all(isinstance(v, str) for v in runs.values())
    assert library_versions(["surely-not-installed-xyz"]) == {"surely-not-installed-xyz": "unknown"}
    sweep = library_versions(SWEEP_LIBRARIES, python=True, missing=None)
    assert next(iter(sweep)) == "python" and set(sweep) <= {"python", *SWEEP_LIBRARIES}
    assert library_versions(["surely-not-installed-xyz"], missing=None) == {}


def test_float_columns_follow_the_spec_field_types():
    floats = float_settings()
    # every setting the runs table always cast to float64 ...
    assert {"lr", "momentum", "weight_decay", "dampening", "beta1", "beta2", "eps", "init_scale", "divergence_factor",
            "embed_lr", "embed_weight_decay", "fixed_norm", "final_lr_factor", "decay_gamma", "clip_grad_norm",
            "bn_eps"} <= floats
    # ... and the ones a hand-kept list forgot; never an int or a choice
    assert "init_perturb" in floats
    assert not {"steps", "seed", "width", "depth", "warmup_steps", "optimizer", "schedule", "nesterov"} & floats
