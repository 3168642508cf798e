"""Data sets from disk (raydyn.tasks.disk): npz, parquet, image folders, user loaders; checks and the cache."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydyn.errors import DataError, RaydynError
from raydyn.tasks import disk


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and the default budget."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RAYDYN_CACHE_DIR", str(root))
    monkeypatch.delenv("RAYDYN_DATA_MEMORY_MB", raising=False)
    return root


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setenv("RAYDYN_DATA_MEMORY_MB", "0.0001")  # ~100 bytes: everything is memory-mapped


def arrays(seed=0, n_train=40, n_test=12, sample=(8, 8), classes=5):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.random((n_train, *sample)), "y_train": rng.integers(0, classes - 1, n_train),
            "x_test": rng.random((n_test, *sample)), "y_test": np.r_[classes - 1, rng.integers(0, classes, n_test - 1)]}


def write_npz(path, compressed=False, **a):
    (np.savez_compressed if compressed else np.savez)(path, **a)
    return path


def mapped_file(t: torch.Tensor) -> str | None:
    """The file behind the memory mapping that holds ``t``'s data (None: anonymous memory)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None  # not [heap] etc.
    return None


def assert_same(a, b):
    for n in disk.ARRAY_KEYS:
        ta, tb = getattr(a, n), getattr(b, n)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, n
        assert torch.equal(ta, tb), n
    assert (a.kind, a.out_dim, a.default_loss, a.vocab) == (b.kind, b.out_dim, b.default_loss, b.vocab)


# ----------------------------------------------------------------------------- npz and inference
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_classification(tmp_path, compressed, monkeypatch):
    monkeypatch.setattr(disk, "_CHUNK_BYTES", 700)  # many row chunks: the streaming reader is exercised
    a = arrays()
    d = disk.load_npz(write_npz(tmp_path / "data.npz", compressed, **a))
    assert d.kind == "classification" and d.default_loss == "cross_entropy" and d.vocab == 0
    assert d.out_dim == 5  # largest label (in y_test) + 1
    assert d.x_train.dtype == torch.float32 and d.x_train.shape == (40, 8, 8) and d.input_shape == (8, 8)
    assert d.y_train.dtype == torch.int64 and d.y_test.shape == (12,)
    np.testing.assert_allclose(d.x_test.numpy(), a["x_test"].astype(np.float32))
    np.testing.assert_array_equal(d.y_train.numpy(), a["y_train"])
    assert d.source == str(tmp_path / "data.npz") and not d.memory_mapped


def test_inference_regression_binary_num_classes_tokens(tmp_path):
    rng = np.random.default_rng(1)
    x, xt = rng.random((10, 3)), rng.random((4, 3))
    d = disk.from_arrays(x, rng.random(10), xt, rng.random(4), source="s")
    assert (d.kind, d.out_dim, d.default_loss) == ("regression", 1, "mse") and d.y_train.shape == (10, 1)
    assert d.y_train.dtype == torch.float32
    d = disk.from_arrays(x, rng.random((10, 3)), xt, rng.random((4, 3)), source="s")
    assert (d.kind, d.out_dim) == ("regression", 3) and d.y_test.shape == (4, 3)
    yb = np.array([1, -1] * 5)
    d = disk.from_arrays(x, yb, xt, yb[:4], source="s", task="binary")
    assert (d.kind, d.out_dim, d.default_loss) == ("binary", 1, "hinge")
    assert d.y_train.dtype == torch.float32 and d.y_train.tolist() == [1.0, -1.0] * 5
    d = disk.from_arrays(x, np.zeros(10, int) + 1, xt, np.zeros(4, int), source="s", num_classes=7)
    assert (d.kind, d.out_dim) == ("classification", 7)
    d = disk.from_arrays(x, np.array([0.0, 2.0] * 5), xt, np.zeros(4), source="s", task="classification")
    assert (d.kind, d.out_dim) == ("classification", 3) and d.y_train.dtype == torch.int64
    tok = rng.integers(0, 9, (10, 3)).astype(np.int32)
    d = disk.from_arrays(tok, np.arange(10) % 2, np.array([[0, 1, 11]] * 4), np.arange(4) % 2, source="s",
                         tokens=True)
    assert d.vocab == 12 and d.x_train.dtype == torch.int64 and d.x_train.tolist() == tok.tolist()
    d = disk.from_arrays(tok, np.arange(10) % 2, tok[:4], np.arange(4) % 2, source="s")  # pixels, not tokens
    assert d.x_train.dtype == torch.float32 and d.vocab == 0
    d = disk.from_arrays(torch.arange(10.0), torch.arange(10) % 2, torch.arange(4.0), torch.arange(4) % 2,
                         source="s")  # torch tensors, 1-D x: one scalar feature
    assert d.x_train.shape == (10, 1) and d.out_dim == 2


def test_npz_errors(tmp_path):
    a = arrays()
    p = write_npz(tmp_path / "data.npz", x_train=a["x_train"], y_train=a["y_train"], x_test=a["x_test"])
    with pytest.raises(DataError, match=r"data\.npz: missing key 'y_test' \(found: x_train, y_train, x_test\)$"):
        disk.load_npz(p)
    p = write_npz(tmp_path / "data.npz", **{**a, "x_test": a["x_test"].reshape(12, 64)})
    with pytest.raises(DataError, match=r"data\.npz: x_test samples have shape \(64,\) but x_train samples \(8, 8\)$"):
        disk.load_npz(p)
    p = write_npz(tmp_path / "data.npz", **{**a, "y_train": np.r_[12, a["y_train"][1:]]})
    with pytest.raises(DataError, match=r"data\.npz: y_train has label 12, but num_classes is 10 "
                                        r"\(labels must be in 0\.\.9\)$"):
        disk.load_npz(p, num_classes=10)
    p = write_npz(tmp_path / "data.npz", **{**a, "y_test": np.r_[-1, a["y_test"][1:]]})
    with pytest.raises(DataError, match=r"data\.npz: y_test has label -1 \(sample 0\), but labels must be in 0\.\.4$"):
        disk.load_npz(p)
    p = write_npz(tmp_path / "data.npz", **{**a, "y_train": a["y_train"][:30]})
    with pytest.raises(DataError, match=r"data\.npz: x_train has 40 samples but y_train has 30"):
        disk.load_npz(p)
    p = write_npz(tmp_path / "data.npz", **{**a, "x_test": a["x_test"][:0], "y_test": a["y_test"][:0]})
    with pytest.raises(DataError, match=r"data\.npz: the test split is empty"):
        disk.load_npz(p)
    x = a["x_train"].copy()
    x[3, 0, 0], x[3, 1, 1], x[7, 2, 2] = np.nan, np.nan, np.inf
    xt = a["x_test"].copy()
    xt[5, 0, 0] = 1e300  # finite in float64, inf in float32
    p = write_npz(tmp_path / "data.npz", **{**a, "x_train": x, "x_test": xt})
    with pytest.raises(DataError, match=r"data\.npz: non-finite values: x_train has 3 non-finite values "
                                        r"\(2 NaN, 1 inf; first in sample 3\); x_test has 1 non-finite value "
                                        r"\(1 inf, of which 1 overflow float32; first in sample 5\)$"):
        disk.load_npz(p)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"text\.npz: not a valid \.npz file \(File is not a zip file\)"):
        disk.load_npz(tmp_path / "text.npz")
    good = write_npz(tmp_path / "good.npz", **a).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.npz: not a valid \.npz file"):
        disk.load_npz(tmp_path / "cut.npz")
    with pytest.raises(DataError, match=r"nope\.npz: no such file \(looked for .*nope\.npz\)"):
        disk.load_npz(tmp_path / "nope.npz")
    p = write_npz(tmp_path / "data.npz", **{**a, "y_train": np.array([object()] * 40, dtype=object)})
    with pytest.raises(DataError, match=r"data\.npz: y_train holds pickled Python objects"):
        disk.load_npz(p)


def test_label_and_option_errors():
    x, xt = np.zeros((6, 2)), np.zeros((2, 2))
    with pytest.raises(DataError, match=r"s: y_train has label 0 \(sample 0; 3 labels not -1 or \+1\); "
                                        r"task: binary needs labels -1 or \+1 \(map 0 to -1\)"):
        disk.from_arrays(x, np.array([0, 1] * 3), xt, np.array([1, -1]), source="s", task="binary")
    with pytest.raises(DataError, match=r"s: y_test has label 0\.5 \(sample 1\); class labels must be integers"):
        disk.from_arrays(x, np.zeros(6), xt, np.array([1, 0.5]), source="s", task="classification")
    with pytest.raises(DataError, match=r"s: non-finite values: y_train has 1 non-finite value \(1 NaN; first in "
                                        r"sample 2\)"):
        disk.from_arrays(x, np.array([0, 1, np.nan, 0, 1, 0]), xt, np.zeros(2), source="s")
    with pytest.raises(DataError, match=r"s: every label is 0, so there is one class"):
        disk.from_arrays(x, np.zeros(6, int), xt, np.zeros(2, int), source="s")
    with pytest.raises(DataError, match=r"s: task must be one of classification, regression, binary"):
        disk.from_arrays(x, np.zeros(6), xt, np.zeros(2), source="s", task="segmentation")
    with pytest.raises(DataError, match=r"s: num_classes applies to task: classification only"):
        disk.from_arrays(x, np.zeros(6), xt, np.zeros(2), source="s", task="regression", num_classes=3)
    with pytest.raises(DataError, match=r"s: tokens: true needs integer token ids, but x_train has dtype float64"):
        disk.from_arrays(x, np.zeros(6, int), xt, np.ones(2, int), source="s", tokens=True)
    with pytest.raises(DataError, match=r"s: x_train has token id -3 \(sample 1\); token ids must be >= 0"):
        disk.from_arrays(np.array([[0], [-3]] * 3), np.arange(6) % 2, np.zeros((2, 1), int), np.arange(2), source="s",
                         tokens=True)
    with pytest.raises(DataError, match=r"s: classification needs one label per sample, but y_train has shape"):
        disk.from_arrays(x, np.zeros((6, 3), int), xt, np.zeros((2, 3), int), source="s")


# ----------------------------------------------------------------------------- parquet
def table(n, split=None, width=6, fixed=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, width)).astype(np.float32)
    y = rng.integers(0, 3, n)
    typ = pa.list_(pa.float32(), width) if fixed else pa.list_(pa.float32())
    cols = {"pixels": pa.array(list(x), type=typ), "label": pa.array(y)}
    if split is not None:
        cols["part"] = pa.array(split)
    return pa.table(cols), x, y


def test_parquet_split_column_folder_and_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "_CHUNK_BYTES", 100)  # batches of a few rows
    split = ["train", "test", "train", "train"] * 5
    t1, x1, y1 = table(20, split, seed=1)
    t2, x2, y2 = table(20, split[::-1], seed=2, fixed=True)
    folder = tmp_path / "tables"
    folder.mkdir()
    pq.write_table(t1, folder / "a.parquet", row_group_size=7)
    pq.write_table(t2, folder / "b.parquet")
    (folder / "_SUCCESS").write_text("")
    d = disk.load_parquet(folder, x="pixels", y="label", split="part", shape=[1, 2, 3])
    m1, m2 = np.array(split) == "train", np.array(split[::-1]) == "train"
    xtr = np.concatenate([x1[m1], x2[m2]]).reshape(-1, 1, 2, 3)
    np.testing.assert_array_equal(d.x_train.numpy(), xtr)
    np.testing.assert_array_equal(d.y_test.numpy(), np.concatenate([y1[~m1], y2[~m2]]))
    assert d.kind == "classification" and d.x_test.shape == (10, 1, 2, 3)
    # one file, scalar column x, multi-output regression y (a list column)
    rng = np.random.default_rng(3)
    t = pa.table({"x": rng.random(8), "y": pa.array(list(rng.random((8, 2)))), "split": ["train"] * 6 + ["test"] * 2})
    pq.write_table(t, tmp_path / "one.parquet")
    d = disk.load_parquet(tmp_path / "one.parquet")
    assert (d.kind, d.out_dim) == ("regression", 2) and d.x_train.shape == (6, 1) and d.y_test.shape == (2, 2)


def test_parquet_two_tables(tmp_path):
    ttr, xtr, ytr = table(9)
    tte, xte, yte = table(5, seed=4)
    pq.write_table(ttr, tmp_path / "train.parquet")
    pq.write_table(tte, tmp_path / "test.parquet")
    d = disk.load("parquet", {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet"),
                              "x": "pixels", "y": "label", "num_classes": 4})
    np.testing.assert_array_equal(d.x_test.numpy(), xte)
    np.testing.assert_array_equal(d.y_train.numpy(), ytr)
    assert d.out_dim == 4


def test_parquet_errors(tmp_path):
    t, _, _ = table(4, ["train", "test", "val", "train"])
    pq.write_table(t, tmp_path / "t.parquet")
    p = str(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no column 'x' \(option x; columns: pixels, label, part\)"):
        disk.load_parquet(p)
    with pytest.raises(DataError, match=r"t\.parquet: column 'part' has values other than 'train' and 'test': 'val'"):
        disk.load_parquet(p, x="pixels", y="label", split="part")
    bad = pa.table({"x": pa.array([[1.0, 2.0], [3.0]]), "y": [0, 1], "split": ["train", "test"]})
    pq.write_table(bad, tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match=r"ragged\.parquet: column 'x' has lists of different lengths \(2 and 1"):
        disk.load_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match=r"parquet: give path .* or both train and test \(only train is given\)"):
        disk.load_parquet(train=p)
    with pytest.raises(DataError, match=r"t\.parquet: shape \[4, 4\] has 16 values per sample, but column 'pixels' "
                                        r"has 6"):
        disk.load_parquet(train=p, test=p, x="pixels", y="label", shape=[4, 4])
    (tmp_path / "junk.parquet").write_text("junk")
    with pytest.raises(DataError, match=r"junk\.parquet: not a valid parquet file"):
        disk.load_parquet(tmp_path / "junk.parquet")


# ----------------------------------------------------------------------------- image folders
def write_images(root: Path, classes=("b", "a", "c"), per_class=2, size=(6, 5), rgb_at=None, seed=0):
    """Random 8-bit images; returns {(split, class): [pixel arrays in file order]}."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rgb = rgb_at == (split, c, i)
                px = rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.png")
                out.setdefault((split, c), []).append(px)
    return out


def test_image_folder_pixels_classes_and_cache(tmp_path, cache, monkeypatch):
    root = tmp_path / "imgs"
    px = write_images(root)
    (root / "train" / "a" / "notes.txt").write_text("ignored")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    calls = []
    decode = disk._decode_images
    monkeypatch.setattr(disk, "_decode_images", lambda *a, **k: calls.append(1) or decode(*a, **k))
    d = disk.load_image_folder(root, size=[6, 5])  # the images' own size: no resampling
    assert len(calls) == 1
    assert d.kind == "classification" and d.out_dim == 3 and d.x_train.shape == (6, 1, 6, 5)
    assert d.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # a, b, c: sorted class names
    expect = np.stack([p for c in ("a", "b", "c") for p in px[("train", c)]])[:, None] / 255.0
    np.testing.assert_allclose(d.x_train.numpy(), expect, atol=1 / 255)
    assert d.x_train.dtype == torch.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    # second load: from the cache, same tensors; nothing written into the data folder
    d2 = disk.load_image_folder(root, size=[6, 5])
    assert len(calls) == 1
    assert_same(d, d2)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["images"]  # no temporary folders left
    # a changed image invalidates the cache
    new = np.full((6, 5), 255, np.uint8)
    Image.fromarray(new).save(root / "train" / "b" / "1.png")
    os.utime(root / "train" / "b" / "1.png", ns=(1, 10**18))
    d3 = disk.load_image_folder(root, size=[6, 5])
    assert len(calls) == 2
    np.testing.assert_allclose(d3.x_train[3, 0].numpy(), 1.0)
    # resizing: square int size, bilinear
    d4 = disk.load_image_folder(root, size=3)
    assert d4.x_train.shape == (6, 1, 3, 3)
    ref = np.asarray(Image.fromarray(px[("test", "a")][0]).resize((3, 3), Image.Resampling.BILINEAR)) / 255.0
    np.testing.assert_allclose(d4.x_test[0, 0].numpy(), ref, atol=1e-6)


def test_image_folder_rgb_channels(tmp_path):
    root = tmp_path / "imgs"
    px = write_images(root, classes=("x", "y"), per_class=1, rgb_at=("test", "y", 0))
    d = disk.load("image_folder", {"root": str(root), "size": [6, 5]})  # one RGB image: every image is RGB
    assert d.x_train.shape == (2, 3, 6, 5)
    np.testing.assert_allclose(d.x_test[1].numpy(), px[("test", "y")][0].transpose(2, 0, 1) / 255.0, atol=1 / 255)
    gray = px[("train", "x")][0] / 255.0
    for ch in range(3):
        np.testing.assert_allclose(d.x_train[0, ch].numpy(), gray, atol=1 / 255)
    d1 = disk.load_image_folder(root, size=[6, 5], channels=1)
    assert d1.x_train.shape == (2, 1, 6, 5)


def test_image_folder_errors(tmp_path):
    root = tmp_path / "digits_png"
    write_images(root, classes=("1", "2", "3"), per_class=1)
    (root / "train" / "4").mkdir()
    with pytest.raises(DataError, match=r"digits_png/train/4: empty class folder \(no \.png/\.jpg/\.jpeg files\)$"):
        disk.load_image_folder(str(root), size=8)
    (root / "train" / "4" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"digits_png/train/4/x\.png: cannot decode image: .+"):
        disk.load_image_folder(str(root), size=8)
    (root / "train" / "4" / "x.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "train" / "4" / "x.png")
    (root / "test" / "9").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "test" / "9" / "y.jpg")
    with pytest.raises(DataError, match=r"digits_png/test/9: class '9' is not a train class \(train classes: "
                                        r"1, 2, 3, 4\)"):
        disk.load_image_folder(str(root), size=8)
    with pytest.raises(DataError, match=r"nothing: no such folder"):
        disk.load_image_folder(str(tmp_path / "nothing"), size=8)
    with pytest.raises(DataError, match=r"size must be a positive integer or \[height, width\]"):
        disk.load_image_folder(str(root), size=[8])


# ----------------------------------------------------------------------------- user loaders
LOADER = '''
import numpy as np
import torch

def make(n=10, offset=0.0):
    rng = np.random.default_rng(0)
    x = rng.random((n, 4)) + offset
    return x, np.arange(n) % 3, x[:3], np.array([0, 1, 2])

def as_mapping():
    return {"x_train": torch.ones(4, 2), "y_train": torch.tensor([0.5, 1.5, 2.5, 3.5]),
            "x_test": torch.zeros(2, 2), "y_test": torch.tensor([1.0, 2.0])}

def broken():
    raise RuntimeError("no data here")

def wrong():
    return 42

NOT_CALLABLE = 3
'''


@pytest.fixture
def loader_module(tmp_path, monkeypatch):
    name = f"user_data_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(LOADER))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_callable(loader_module):
    m = loader_module
    d = disk.load(f"{m}:make", {"n": 6, "offset": 1.0, "task": None, "num_classes": 4, "tokens": False})
    assert (d.kind, d.out_dim) == ("classification", 4) and d.x_train.shape == (6, 4) and d.source == f"{m}:make"
    assert float(d.x_train.min()) >= 1.0  # options reached the loader; reserved ones did not (no TypeError)
    d = disk.load_callable(f"{m}:as_mapping")
    assert (d.kind, d.out_dim) == ("regression", 1) and d.y_train.shape == (4, 1)
    with pytest.raises(DataError, match=rf"task\.dataset: '{m}:nothing': '{m}' has no attribute 'nothing'"):
        disk.load_callable(f"{m}:nothing")
    with pytest.raises(DataError, match=r"task\.dataset: 'no_such_module_xyz:f': module 'no_such_module_xyz' "
                                        r"not found"):
        disk.load_callable("no_such_module_xyz:f")
    with pytest.raises(DataError, match=rf"task\.dataset: '{m}:NOT_CALLABLE' is a int, not a callable"):
        disk.load_callable(f"{m}:NOT_CALLABLE")
    with pytest.raises(DataError, match=rf"{m}:broken: the loader raised RuntimeError: no data here"):
        disk.load_callable(f"{m}:broken")
    with pytest.raises(DataError, match=rf"{m}:wrong: returned a int; expected \(x_train, y_train, x_test, y_test\)"):
        disk.load_callable(f"{m}:wrong")
    with pytest.raises(DataError, match=rf"{m}:make: y_train has label 2, but num_classes is 2"):
        disk.load_callable(f"{m}:make", num_classes=2)


def test_dispatcher_and_tables(tmp_path):
    assert set(disk.DISK_OPTIONS) == {"npz", "parquet", "image_folder"}
    for kind, opts in disk.DISK_OPTIONS.items():
        assert {k: opts[k] for k in disk.RESERVED_OPTIONS} == {"task": None, "num_classes": None, "tokens": False}
        assert set(disk.PATH_OPTIONS[kind]) <= set(opts) and disk.DISK_DOCS[kind]
    assert disk.DISK_OPTIONS["npz"]["path"] is disk.REQUIRED
    assert disk.DISK_OPTIONS["image_folder"] == {"root": disk.REQUIRED, "size": 32, "channels": None,
                                                 **disk.RESERVED_OPTIONS}
    assert issubclass(DataError, RaydynError)
    with pytest.raises(DataError, match=r"unknown data kind 'csv'"):
        disk.load("csv", {})
    with pytest.raises(DataError, match=r"npz: unknown option 'root'; allowed: path, task, num_classes, tokens"):
        disk.load("npz", {"root": "x"})
    with pytest.raises(DataError, match=r"npz: option 'path' is required"):
        disk.load("npz", {})
    d = disk.load("npz", {"path": str(write_npz(tmp_path / "d.npz", **arrays())), "task": None, "num_classes": None,
                          "tokens": False})
    assert d.out_dim == 5


# ----------------------------------------------------------------------------- the memory budget
def test_memory_budget_npz_mapped(tmp_path, cache, monkeypatch):
    a = arrays(n_train=300)
    p = write_npz(tmp_path / "big.npz", compressed=True, **a)
    small = disk.load_npz(p)
    assert not small.memory_mapped and mapped_file(small.x_train) is None
    monkeypatch.setenv("RAYDYN_DATA_MEMORY_MB", "0.01")  # 10 KiB < 300 * 64 * 4 bytes
    monkeypatch.setattr(disk, "_CHUNK_BYTES", 4096)
    big = disk.load_npz(p)
    assert big.memory_mapped
    for n in disk.ARRAY_KEYS:
        f = mapped_file(getattr(big, n))
        assert f is not None and Path(f).parent.parent == cache and Path(f).name == f"{n}.npy", (n, f)
    assert_same(big, small)
    entries = sorted(cache.iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["arrays"]
    again = disk.load_npz(p)  # reuses the entry
    assert sorted(cache.iterdir()) == entries and mapped_file(again.x_train) == mapped_file(big.x_train)
    again.x_train[0, 0, 0] = 123.0  # copy-on-write: private to this process, the file keeps its values
    assert float(disk.load_npz(p).x_train[0, 0, 0]) == pytest.approx(float(small.x_train[0, 0, 0]))
    os.utime(p, ns=(1, 10**18))  # the file changed: a new entry
    disk.load_npz(p)
    assert len(list(cache.iterdir())) == 2


def test_memory_budget_other_kinds(tmp_path, cache, tiny_budget, loader_module, monkeypatch):
    root = tmp_path / "imgs"
    write_images(root)
    d = disk.load_image_folder(root, size=4)
    assert d.memory_mapped and Path(mapped_file(d.x_train)).parent.name.startswith("images-")  # no second copy
    m = loader_module
    d = disk.load_callable(f"{m}:make", n=20)
    assert d.memory_mapped and Path(mapped_file(d.y_train)).parent.name.startswith("arrays-")
    t, _, _ = table(12, ["train", "test"] * 6)
    pq.write_table(t, tmp_path / "t.parquet")
    d = disk.load_parquet(tmp_path / "t.parquet", x="pixels", y="label", split="part")
    assert d.memory_mapped and mapped_file(d.x_test) is not None
    monkeypatch.delenv("RAYDYN_DATA_MEMORY_MB")
    assert_same(d, disk.load_parquet(tmp_path / "t.parquet", x="pixels", y="label", split="part"))


def test_cache_entry_publication_race(cache, monkeypatch):
    """Two processes building one entry: the second keeps the first one's entry and leaves nothing behind."""
    cache.mkdir(parents=True)
    final = cache / "arrays-test"

    def fill(tmp, value):
        for n in disk.ARRAY_KEYS:
            np.save(tmp / f"{n}.npy", np.full(2, value))
        return {"value": value}

    disk._write_entry(final, lambda tmp: fill(tmp, 1))
    disk._write_entry(final, lambda tmp: fill(tmp, 2))
    assert disk._read_meta(final) == {"value": 1} and [p.name for p in cache.iterdir()] == ["arrays-test"]
    with pytest.raises(DataError, match="boom"):
        disk._write_entry(cache / "arrays-other", lambda tmp: (_ for _ in ()).throw(DataError("boom")))
    assert [p.name for p in cache.iterdir()] == ["arrays-test"]
    monkeypatch.setenv("RAYDYN_DATA_MEMORY_MB", "lots")
    with pytest.raises(DataError, match=r"RAYDYN_DATA_MEMORY_MB must be a number of MiB >= 0, got 'lots'"):
        disk.memory_budget_bytes()


# ----------------------------------------------------------------------------- the bundled digits, cached
def test_digits_from_the_cache_equal_scikit_learns_split(cache):
    from raydyn.tasks.data import _DIGITS_KEYS, _digits_split, digits

    for frac, seed in ((0.2, 0), (0.3, 5)):
        want = _digits_split(frac, seed)
        for _ in range(2):  # computed and written, then read back
            d = digits(frac, seed)
            got = dict(zip(_DIGITS_KEYS, (d.x_train, d.y_train, d.x_test, d.y_test)))
            for k in _DIGITS_KEYS:
                assert got[k].numpy().dtype == want[k].dtype and np.array_equal(got[k].numpy(), want[k]), k
    assert len(list(cache.glob("digits-*.npz"))) == 2


def test_a_corrupt_digits_entry_is_recomputed_and_a_cached_one_needs_no_scikit_learn(cache):
    import subprocess

    from raydyn.tasks.data import _digits_split, digits

    digits(0.2, 0)
    (entry,) = cache.glob("digits-*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    assert np.array_equal(digits(0.2, 0).x_test.numpy(), _digits_split(0.2, 0)["x_test"])
    code = ("import sys; from raydyn.tasks.data import digits; d = digits(0.2, 0); "
            "assert 'sklearn' not in sys.modules, 'imported scikit-learn'; print(d.x_train.shape[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RAYDYN_CACHE_DIR": str(cache)})
    assert out.returncode == 0 and out.stdout.strip() == "1437", out.stderr


def test_digits_without_a_writable_cache_folder(tmp_path, monkeypatch):
    from raydyn.tasks.data import _digits_split, digits

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RAYDYN_CACHE_DIR", str(blocker / "cache"))
    assert np.array_equal(digits(0.2, 0).y_train.numpy(), _digits_split(0.2, 0)["y_train"])
