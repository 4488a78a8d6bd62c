"""The recipes' in-memory data loaders (examples/recipe_lib/datasets.py) on tiny synthetic files.

Each test writes its own files in each on-disk format into tmp_path; one test
reads the real Fashion-MNIST when the Debian package is installed.
"""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_cifar10, make_folder, save_image, write_pickle
from recipe_lib.datasets import (
    FASHION_MNIST_DIR,
    DatasetError,
    MissingDataError,
    idx_bytes,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    write_idx,
)

Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------- IDX / Fashion-MNIST

def make_fashion(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_decodes(tmp_path, gz):
    arrays = make_fashion(tmp_path, gz=gz)
    splits = load_fashion_mnist(tmp_path)
    for split, prefix in ((splits.train, "train"), (splits.test, "t10k")):
        images, labels = arrays[prefix]
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(split.images[:, 0], torch.from_numpy(images))
        assert split.labels.dtype == torch.int64 and torch.equal(split.labels, torch.from_numpy(labels).long())
        assert split.classes[0] == "T-shirt/top" and split.num_classes == 10 and split.name == "fashion_mnist"
    assert load_dataset("fashion-mnist", tmp_path).train.images.shape[0] == 12


def test_idx_wrong_magic(tmp_path):
    make_fashion(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(12, np.uint8), magic=0x00000803))  # the images magic on a labels file
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*magic"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    make_fashion(tmp_path, gz=gz)
    payload = idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]
    write_idx(tmp_path / "t10k-images-idx3-ubyte", payload, gz)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*truncated"):
        load_fashion_mnist(tmp_path)


def test_idx_truncated_gzip_stream(tmp_path):
    make_fashion(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])  # a cut download: the gzip stream itself ends early
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_idx_count_mismatch(tmp_path):
    make_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: 11 labels but .*train-images-idx3-ubyte holds 12"):
        load_fashion_mnist(tmp_path)


def test_idx_missing_file(tmp_path):
    make_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingDataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_default_dir_says_how_to_install(monkeypatch, tmp_path):
    import recipe_lib.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    splits = load_fashion_mnist()
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.num_classes == 10
    assert torch.equal(splits.train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(splits.test.labels.bincount(), torch.full((10,), 1000))


# ----------------------------------------------------------------- CIFAR

def test_cifar10_decodes(tmp_path):
    expected = make_cifar10(tmp_path / "cifar-10-batches-py")
    splits = load_cifar(tmp_path, 10)  # the parent folder works too
    assert splits.train.images.shape == (15, 3, 32, 32) and splits.test.images.shape == (3, 3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    assert splits.train.images[4, 1, 2, 5] == expected["train"][4, 1024 + 2 * 32 + 5]
    assert torch.equal(splits.train.images.reshape(15, -1), torch.from_numpy(expected["train"]))
    assert splits.train.labels.tolist() == expected["train_labels"].tolist()
    assert splits.test.labels.tolist() == expected["test_labels"].tolist()
    assert splits.train.classes == tuple(f"c{i}" for i in range(10)) and splits.train.name == "cifar10"


def test_cifar100_decodes_with_str_keys(tmp_path):
    rng = np.random.default_rng(2)
    write_pickle(tmp_path / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []})
    rows = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 4), ("test", 2))}
    for split, data in rows.items():
        write_pickle(tmp_path / split, {"data": data, "fine_labels": [99, 0, 5, 7][: len(data)],
                                        "coarse_labels": [0] * len(data)})
    splits = load_dataset("cifar100", tmp_path)
    assert splits.train.labels.tolist() == [99, 0, 5, 7] and splits.test.labels.tolist() == [99, 0]
    assert splits.train.num_classes == 100 and splits.train.classes[99] == "f99"
    assert torch.equal(splits.test.images.reshape(2, -1), torch.from_numpy(rows["test"]))


def test_cifar_missing_batch(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(MissingDataError, match="data_batch_3"):
        load_cifar(tmp_path)


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="test_batch: not a readable pickle"):
        load_cifar(tmp_path)


def test_cifar_wrong_shape(tmp_path):
    make_cifar10(tmp_path)
    write_pickle(tmp_path / "data_batch_2", {b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DatasetError, match=r"data_batch_2: 'data' must be uint8 \[N, 3072\]"):
        load_cifar(tmp_path)


def test_cifar_missing_key_and_label_count(tmp_path):
    make_cifar10(tmp_path)
    write_pickle(tmp_path / "data_batch_1", {b"data": np.zeros((3, 3072), np.uint8)})
    with pytest.raises(DatasetError, match="data_batch_1: missing key 'labels'"):
        load_cifar(tmp_path)
    write_pickle(tmp_path / "data_batch_1", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]})
    with pytest.raises(DatasetError, match="data_batch_1: 2 labels for 3 images"):
        load_cifar(tmp_path)


# A crafted "batch" must not run code: the loader's unpickler admits only the
# globals numpy arrays and builtin containers need (hostile-tester finding).

class _OpensMarker:
    """Unpickles as ``open(marker, "w")``: creates the marker file if the global is admitted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _RunsShell:
    """Unpickles as ``os.system("touch marker")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("gadget, refused", [(_OpensMarker, r"io\.open"), (_RunsShell, r"(posix|nt)\.system")])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickle_refuses_code_before_running_it(tmp_path, gadget, refused, protocol):
    root = tmp_path / "cifar-10-batches-py"
    make_cifar10(root)
    marker = tmp_path / "pwned"
    with (root / "data_batch_1").open("wb") as f:  # looks like a batch; 'data' is the payload
        pickle.dump({b"batch_label": b"x", b"data": gadget(marker), b"labels": [0, 1, 2]}, f, protocol=protocol)
    with pytest.raises(DatasetError, match=rf"cifar-10-batches-py/data_batch_1: refuses to load {refused} "
                                           r"from a pickle; not a CIFAR batch"):
        load_cifar(tmp_path)
    assert not marker.exists()


def global_call_pickle(module: str, name: str) -> bytes:
    """A protocol-2 pickle that calls ``module.name()`` (GLOBAL, EMPTY_TUPLE, REDUCE)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("__builtin__", "getattr"), ("builtins", "bytearray"), ("copyreg", "_reconstructor"),
    ("numpy", "load"), ("numpy", "frombuffer"), ("numpy.core.multiarray", "_reconstruct_"),
    ("numpy._core.numeric", "fromstring"), ("_codecs", "decode"), ("subprocess", "call"),
])
def test_cifar_pickle_refuses_any_other_global(tmp_path, module, name):
    make_cifar10(tmp_path)
    (tmp_path / "batches.meta").write_bytes(global_call_pickle(module, name))
    with pytest.raises(DatasetError, match=rf"batches.meta: refuses to load {module}\.{name} from a pickle"):
        load_cifar(tmp_path)


def test_cifar_pickle_codecs_encode_is_latin1_only(tmp_path):
    # Python 3 writes bytes at protocols 0-2 as _codecs.encode(text, 'latin1'); nothing else is admitted.
    make_cifar10(tmp_path)
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(payload) == "nop"  # the stock unpickler runs it
    (tmp_path / "batches.meta").write_bytes(payload)
    with pytest.raises(DatasetError, match=r"batches.meta: .*_codecs\.encode.*'latin1'"):
        load_cifar(tmp_path)


@pytest.mark.parametrize("module, name", [("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
                                          ("_codecs", "encode")])
@pytest.mark.parametrize("state", ["slots", "dict"])
def test_cifar_pickle_cannot_rewrite_an_admitted_function(tmp_path, module, name, state):
    # BUILD on an admitted global sets attributes on it; on a shared Python function that would
    # change it for the whole process (here its defaults), so the loader hands out fresh wrappers.
    from numpy._core import numeric

    make_cifar10(tmp_path)
    attrs = b"}X\x0c\x00\x00\x00__defaults__K\x07\x85s"  # {'__defaults__': (7,)}
    build = b"N" + attrs + b"\x86b" if state == "slots" else attrs + b"b"  # (None, slots) or a __dict__ update
    (tmp_path / "batches.meta").write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + build + b".")
    import recipe_lib.datasets as datasets

    functions = (numeric._frombuffer, datasets._latin1_encode)
    before = [(f.__defaults__, dict(f.__dict__)) for f in functions]
    try:
        with pytest.raises(DatasetError, match="batches.meta: expected a pickled dict, got function"):
            load_cifar(tmp_path)
        assert [(f.__defaults__, dict(f.__dict__)) for f in functions] == before
    finally:  # a failure must not leave numpy broken for the tests after it
        for f, (defaults, attrs) in zip(functions, before):
            f.__defaults__ = defaults
            f.__dict__.clear()
            f.__dict__.update(attrs)

@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_loads_every_pickle_protocol_of_this_numpy(tmp_path, protocol):
    # numpy 2 writes numpy._core.* (and _frombuffer at protocol 5), Python 3 at protocols 0-2 writes
    # bytes through _codecs.encode and sets through __builtin__.set: all must load.
    expected = make_cifar10(tmp_path)
    rng = np.random.default_rng(3)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": np.int64(3072),
            b"num_cases_per_batch": 3, b"spare": {1, 2}, b"frozen": frozenset({3})}
    with (tmp_path / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"data": rows, b"labels": np.array([1, 2, 3]),
                     b"filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
    splits = load_cifar(tmp_path)
    assert torch.equal(splits.test.images.reshape(3, -1), torch.from_numpy(rows))
    assert splits.test.labels.tolist() == [1, 2, 3]
    assert torch.equal(splits.train.images.reshape(15, -1), torch.from_numpy(expected["train"]))


class _Python2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2's cPickle wrote ``str`` (SHORT_BINSTRING/BINSTRING), as the official files do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def test_cifar_loads_python2_numpy1_style_pickles(tmp_path):
    # The official archives are Python 2 pickles of numpy 1 arrays: numpy.core.multiarray._reconstruct,
    # numpy.ndarray, numpy.dtype, the raw pixels as a binary string, read with encoding='bytes'.
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    for name, obj in (("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}),
                      *((f"data_batch_{i}", {b"data": rows, b"labels": [i, 9]}) for i in range(1, 6)),
                      ("test_batch", {b"data": rows[::-1].copy(), b"labels": [4, 5]})):
        buffer = __import__("io").BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(obj)
        payload = buffer.getvalue()
        assert b"_codecs" not in payload
        (tmp_path / name).write_bytes(payload.replace(b"cnumpy._core.", b"cnumpy.core."))
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in (tmp_path / "test_batch").read_bytes()
    splits = load_cifar(tmp_path)
    assert torch.equal(splits.test.images.reshape(2, -1), torch.from_numpy(rows[::-1].copy()))
    assert splits.train.labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert splits.train.classes[3] == "c3"


# ----------------------------------------------------------------- image folders

def test_image_folder_decodes(tmp_path):
    pixels = make_folder(tmp_path)
    splits = load_image_folder(tmp_path)
    assert splits.train.classes == ("buildings", "glacier") == splits.test.classes
    assert splits.train.images.shape == (4, 3, 6, 8) and splits.test.images.shape == (2, 3, 6, 8)
    # Sorted by class then file: buildings/img0, buildings/img1, glacier/img0, glacier/img1.
    assert splits.train.labels.tolist() == [0, 0, 1, 1] and splits.test.labels.tolist() == [0, 1]
    expected = [pixels["train"][2], pixels["train"][3], pixels["train"][0], pixels["train"][1]]
    for got, want in zip(splits.train.images, expected):
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(want))  # PNG is lossless


def test_image_folder_intel_layout_resize_and_grayscale(tmp_path):
    # Intel's Kaggle archive: seg_train/seg_train/<class>, seg_test/seg_test/<class>; a JPEG and a gray image.
    make_folder(tmp_path, "seg_train/seg_train", "seg_test/seg_test")
    save_image(tmp_path / "seg_train/seg_train/glacier/img9.jpg", (0, 0, 0), size=(20, 10))
    save_image(tmp_path / "seg_test/seg_test/glacier/gray.png", (0, 0, 0), mode="L")
    splits = load_dataset("folder", tmp_path, image_size=(4, 5))
    assert splits.train.images.shape == (5, 3, 4, 5) and splits.test.images.shape == (3, 3, 4, 5)
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 1]


def test_image_folder_inconsistent_sizes(tmp_path):
    make_folder(tmp_path)
    save_image(tmp_path / "train/glacier/odd.png", (1, 2, 3), size=(9, 6))
    with pytest.raises(DatasetError, match=r"odd.png: image is 9x6.*image_size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=6).train.images.shape == (5, 3, 6, 6)


def test_image_folder_unreadable_image(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "test/buildings/broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="broken.png: unreadable image"):
        load_image_folder(tmp_path)


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header, no real data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_image_folder_decompression_bomb_names_the_file(tmp_path):
    # 20000x20000 = 4e8 pixels, over twice PIL.Image.MAX_IMAGE_PIXELS: PIL raises DecompressionBombError.
    make_folder(tmp_path)
    (tmp_path / "test/glacier/bomb.png").write_bytes(png_header_only(20000, 20000))
    with pytest.raises(DatasetError, match=r"test/glacier/bomb.png: image is too large \(Pillow: .*400000000 pixels.*\), "
                                           r"over PIL\.Image\.MAX_IMAGE_PIXELS = \d+: refused as a possible decompression "
                                           r"bomb.*raise PIL\.Image\.MAX_IMAGE_PIXELS.*--image-size does not help"):
        load_image_folder(tmp_path, image_size=8)


@pytest.mark.parametrize("size", [(15, 10), (20, 10), (21, 10), (300, 10)])  # 1.5x, 2x (PIL warns), >2x (PIL raises)
@pytest.mark.parametrize("warnings_as_errors", [False, True])
def test_image_folder_over_max_image_pixels_is_an_error(tmp_path, monkeypatch, size, warnings_as_errors):
    make_folder(tmp_path)  # 8x6 = 48 pixels each, under the limit
    save_image(tmp_path / "train/buildings/big.png", (5, 5, 5), size=size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        # Between 1x and 2x the limit PIL only warns; under -W error its warning is raised instead.
        warnings.simplefilter("error" if warnings_as_errors else "ignore", Image.DecompressionBombWarning)
        # Our own check names the size; where Pillow raises first (over 2x, or its warning as an
        # error) its message gives the pixel count.
        pixels = size[0] * size[1]
        with pytest.raises(DatasetError, match=rf"train/buildings/big.png: image is ({size[0]}x{size[1]} = {pixels} "
                                               rf"pixels|too large \(Pillow: .*\b{pixels} pixels.*\)), over "
                                               r"PIL\.Image\.MAX_IMAGE_PIXELS = 100: refused"):
            load_image_folder(tmp_path, image_size=6)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # how to allow it when intended
    assert load_image_folder(tmp_path, image_size=6).train.images.shape == (5, 3, 6, 6)


def test_image_folder_empty(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="train: no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "train/forest").mkdir()
    with pytest.raises(DatasetError, match="forest: class folder holds no images"):
        load_image_folder(tmp_path)


def test_image_folder_missing_split_and_class_mismatch(tmp_path):
    make_folder(tmp_path)
    save_image(tmp_path / "test/sea/img0.png", (1, 1, 1))
    with pytest.raises(DatasetError, match=r"different class folders: only in train \[\], only in test \['sea'\]"):
        load_image_folder(tmp_path)
    with pytest.raises(MissingDataError, match="no 'train'"):
        load_image_folder(tmp_path / "test")


def test_dataset_subset_and_dispatch_errors(tmp_path):
    make_fashion(tmp_path, n_train=40)
    train = load_dataset("fashion_mnist", tmp_path).train
    sub = train.subset(10, seed=3)
    assert len(sub) == 10 and sub.classes == train.classes
    assert torch.equal(sub.images, train.subset(10, seed=3).images)  # seeded
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="image_size applies to 'folder'"):
        load_dataset("cifar10", tmp_path, image_size=32)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("cifar10")


def test_synthetic_fashion_mnist_loads_and_is_learnable(tmp_path):
    from recipe_lib.datasets import write_synthetic_fashion_mnist

    splits = load_fashion_mnist(write_synthetic_fashion_mnist(tmp_path / "synthetic", n_train=40, n_test=10))
    assert splits.train.images.shape == (40, 1, 28, 28) and splits.test.labels.shape == (10,)
    # The class is written in the image: the brightest band of rows starts at row 2k.
    rows = splits.train.images[:, 0].float().mean(dim=2)
    bands = torch.stack([rows[:, 2 * k:2 * k + 5].mean(1) for k in range(10)], dim=1)
    assert torch.equal(bands.argmax(1), splits.train.labels)
