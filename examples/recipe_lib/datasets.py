"""Loaders that decode a whole data set into memory as uint8 tensors.

Every loader returns a :class:`DataSplits` of two :class:`ImageDataset`\\ s whose
``images`` are uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``. Keeping the
decoded uint8 pixels (not floats) costs 1 byte per value: CIFAR-10 is 180 MB,
Fashion-MNIST 55 MB, the Intel image set (150x150) about 1.7 GB. Batches are
then sliced, moved and augmented on the training device (``loader.py``,
``transforms.py``), so no worker processes are needed.

Every error about the files on disk is a :class:`DatasetError` whose message
names the offending file, because "bad magic number" is useless without it.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch

# Where the Debian package `dataset-fashion-mnist` installs the four gzipped
# IDX files (checked against the package's file list, 0.0~git20200523).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "folder")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_CIFAR_ROW = 3 * 32 * 32
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DatasetError(ValueError):
    """A data file or folder is missing, corrupt or inconsistent (the message names it)."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A data file or directory does not exist."""


@dataclass
class ImageDataset:
    """One split held in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``, each in ``[0, len(classes))``.
        classes: class names, index = label.
        name: the data set's name (``fashion_mnist``, ``cifar10``, ...), used to
            pick default normalization statistics.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {tuple(self.labels.shape)}")
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """``n`` samples drawn without replacement (seeded), kept in their original order.

        Random rather than the first ``n`` because folder data sets are sorted
        by class: the first 1000 images would be one or two classes.
        """
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(self), generator=g)[:n].sort().values
        keep = keep.to(self.images.device)
        return ImageDataset(self.images[keep], self.labels[keep.to(self.labels.device)], self.classes, self.name)

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same data on ``device`` (e.g. the whole uint8 set on the GPU, so batches never cross PCIe)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes, self.name)


@dataclass
class DataSplits:
    """The train and test splits of one data set."""

    train: ImageDataset
    test: ImageDataset


# --------------------------------------------------------------------------- IDX

def _open_maybe_gz(path: Path) -> bytes:
    """Read ``path`` or ``path.gz`` whole; the gz variant is what the Debian package ships."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            try:
                if candidate.suffix == ".gz":
                    with gzip.open(candidate, "rb") as f:
                        return f.read()
                return candidate.read_bytes()
            except (OSError, EOFError) as e:  # truncated/corrupt gzip stream
                raise DatasetError(f"{candidate}: cannot read ({e})") from e
    raise MissingDataError(f"{path}: no such file (nor {path.name}.gz)")


def read_idx(path: Path | str, expected_magic: int) -> torch.Tensor:
    """Parse an IDX file of unsigned bytes (``path`` or ``path.gz``) into a uint8 tensor.

    Layout: a big-endian int32 magic ``0x000008nd`` (0x08 = unsigned byte, nd =
    number of dimensions), nd big-endian int32 sizes, then the bytes.
    """
    path = Path(path)
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: file is {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">i", data[:4])
    if magic != expected_magic:
        raise DatasetError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: file {what}: {len(data)} bytes but the header {list(dims)} needs {expected}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())  # copy: frombuffer's array is read-only


def _load_idx_split(directory: Path, prefix: str, num_classes: int) -> ImageDataset:
    images_path = directory / f"{prefix}-images-idx3-ubyte"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte"
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{labels_path}: {labels.shape[0]} labels but {images_path} holds {images.shape[0]} images")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} out of range for {num_classes} classes")
    return ImageDataset(images.unsqueeze(1), labels.long(), FASHION_MNIST_CLASSES, "fashion_mnist")


def load_fashion_mnist(data_dir: Path | str | None = None) -> DataSplits:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes) from IDX files.

    Args:
        data_dir: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
            (each optionally ``.gz``). Default: the Debian package's folder
            ``/usr/share/datasets/fashion-mnist``.
    """
    if data_dir is None:
        if not FASHION_MNIST_DIR.is_dir():
            raise MissingDataError(
                f"{FASHION_MNIST_DIR}: not found. Install it with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four "
                "IDX files from https://github.com/zalandoresearch/fashion-mnist and pass --data-dir DIR")
        data_dir = FASHION_MNIST_DIR
    directory = Path(data_dir)
    if not directory.is_dir():
        raise MissingDataError(f"{directory}: no such directory (pass --data-dir with the Fashion-MNIST IDX files)")
    classes = len(FASHION_MNIST_CLASSES)
    return DataSplits(_load_idx_split(directory, "train", classes), _load_idx_split(directory, "t10k", classes))


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """``array`` (uint8) as an IDX file: magic ``0x000008nd`` (or ``magic``), the sizes, the bytes."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path: Path, payload: bytes, gz: bool = True) -> Path:
    """Write IDX bytes at ``path`` (at ``path.gz``, gzipped, when ``gz``); returns the path written."""
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_synthetic_fashion_mnist(directory: Path | str, n_train: int = 2048, n_test: int = 512,
                                  seed: int = 0) -> Path:
    """A learnable stand-in for Fashion-MNIST, in its four gzipped IDX files.

    Class k is a bright band at rows 2k..2k+4 over uniform noise: a small
    network learns it in an epoch or two. For smoke runs of the recipes where
    the real data is not installed (a GPU machine without network, CI); never
    for results. Returns ``directory``, ready for ``--data-dir``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = synthetic_bands(n, rng)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels))
    return directory


def synthetic_bands(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 28x28 uint8 images and their labels: class k is a bright band at rows 2k..2k+4 over noise.

    The generator behind :func:`write_synthetic_fashion_mnist`, for data kept in memory
    (``examples/swap_the_import.py``). Draws the labels, then the noise, from ``rng``.
    """
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 90, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k:2 * k + 5, 4:24] += 150
    return images, labels


# --------------------------------------------------------------------------- CIFAR

def _numpy_core(submodule: str, name: str) -> object:
    """``numpy._core.<submodule>.<name>`` (numpy 2), else ``numpy.core.<submodule>.<name>`` (numpy 1).

    Both spellings in a pickle resolve to the same function here, so numpy 1
    pickles (the official Python 2 files) load on numpy 2 and vice versa,
    without touching numpy 2's deprecated ``numpy.core`` shim.
    """
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles use it for bytes at protocols 0-2: latin-1 only.

    Any other codec is refused: pickle never writes one, and arbitrary codecs
    (including any a library registered) are code we did not mean to admit.
    """
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted for 'latin1' text only, got {encoding!r}")
    return text.encode("latin-1")


def _fresh(fn: Callable[..., object]) -> Callable[..., object]:
    """A new function that calls ``fn``, so a pickle's ``BUILD`` on it cannot alter ``fn`` itself.

    ``BUILD`` on any object sets its attributes (``__dict__`` or ``setattr``);
    on a shared Python function (numpy's ``_frombuffer``, :func:`_latin1_encode`)
    that would rewrite its ``__defaults__`` for the whole process. Built-in
    functions and types refuse new attributes, so they are handed out as is.
    """
    def call(*args: object) -> object:
        return fn(*args)

    return call


# The only globals a CIFAR pickle may name, as (module, name) written in the
# file, each mapped to what it loads. This is everything numpy arrays and
# scalars need under numpy 1 and 2 at every pickle protocol (0-2 reference
# _reconstruct/ndarray/dtype/scalar, plus _codecs.encode for Python 3 bytes;
# 5 adds _frombuffer), and the two builtin containers without an opcode of
# their own before protocol 4 (Python 2 and Python 3 at protocols 0-2 spell
# builtins as __builtin__). dict, list, tuple, str, bytes, int, float need no
# global. Everything else -- os.system, builtins.eval/getattr/open, copyreg,
# numpy.load -- is how a crafted pickle runs code, and the official files
# never name it.
_PICKLE_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{(f"{package}.multiarray", "_reconstruct"): (lambda: _numpy_core("multiarray", "_reconstruct"))
       for package in ("numpy.core", "numpy._core")},
    **{(f"{package}.multiarray", "scalar"): (lambda: _numpy_core("multiarray", "scalar"))
       for package in ("numpy.core", "numpy._core")},
    **{(f"{package}.numeric", "_frombuffer"): (lambda: _fresh(_numpy_core("numeric", "_frombuffer")))
       for package in ("numpy.core", "numpy._core")},
    ("_codecs", "encode"): lambda: _fresh(_latin1_encode),
    **{(module, "set"): (lambda: set) for module in ("builtins", "__builtin__")},
    **{(module, "frozenset"): (lambda: frozenset) for module in ("builtins", "__builtin__")},
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_PICKLE_GLOBALS`.

    A pickle runs code by naming a callable global (``GLOBAL``/``STACK_GLOBAL``/
    ``INST``/``EXT*`` all go through :meth:`find_class`) and calling it with
    ``REDUCE``/``BUILD``; refusing the name refuses the call before anything
    runs. What remains admitted only builds arrays, scalars and containers
    (``_fresh`` keeps ``BUILD`` on an admitted function from altering it).
    Persistent ids are refused too (the stock unpickler already refuses them).
    """

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as numpy's raw data needs
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        resolve = _PICKLE_GLOBALS.get((module, name))
        if resolve is None:
            raise DatasetError(f"{self._path}: refuses to load {module}.{name} from a pickle; not a CIFAR batch "
                               "(only numpy arrays and builtin containers are admitted)")
        return resolve()

    def persistent_load(self, pid: object) -> object:
        raise DatasetError(f"{self._path}: refuses a persistent id in a pickle; not a CIFAR batch")


def _unpickle(path: Path) -> dict[str, object]:
    """Load a CIFAR batch; keys come back as ``str`` whether pickled as bytes or str.

    The files are pickles, which can run any code they name while loading, so
    :class:`_CifarUnpickler` admits only the globals numpy arrays and builtin
    containers need and refuses the rest with a :class:`DatasetError` naming
    the file and the global, before it runs.
    """
    if not path.is_file():
        raise MissingDataError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except DatasetError:
        raise  # a refused global: already names the file and what was refused
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... all mean "not a CIFAR batch"
        raise DatasetError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(batch: dict[str, object], key: str, path: Path) -> object:
    if key not in batch:
        raise DatasetError(f"{path}: missing key {key!r} (has {sorted(batch)})")
    return batch[key]


def _cifar_split(paths: Sequence[Path], label_key: str, classes: tuple[str, ...], name: str) -> ImageDataset:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        data = np.asarray(_field(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
            raise DatasetError(f"{path}: 'data' must be uint8 [N, {_CIFAR_ROW}], got {data.dtype} {list(data.shape)}")
        batch_labels = np.asarray(_field(batch, label_key, path), dtype=np.int64).reshape(-1)
        if batch_labels.shape[0] != data.shape[0]:
            raise DatasetError(f"{path}: {batch_labels.shape[0]} labels for {data.shape[0]} images")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= len(classes)):
            raise DatasetError(f"{path}: labels outside [0, {len(classes)})")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are R(1024) G B, row-major
        labels.append(torch.from_numpy(batch_labels))
    return ImageDataset(torch.cat(images), torch.cat(labels), classes, name)


def _class_names(meta_path: Path, key: str) -> tuple[str, ...]:
    names = _field(_unpickle(meta_path), key, meta_path)
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)  # type: ignore[union-attr]


def load_cifar(data_dir: Path | str, num_classes: int = 10) -> DataSplits:
    """CIFAR-10 or CIFAR-100 (50000 train / 10000 test, 3x32x32) from the python pickles.

    Args:
        data_dir: the extracted ``cifar-10-batches-py`` / ``cifar-100-python``
            folder, or the folder containing it.
        num_classes: 10 or 100.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    directory = Path(data_dir)
    inner = directory / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    if inner.is_dir():
        directory = inner
    if not directory.is_dir():
        raise MissingDataError(
            f"{directory}: no such directory; download https://www.cs.toronto.edu/~kriz/"
            f"cifar-{num_classes}-python.tar.gz, extract it and pass --data-dir")
    if num_classes == 10:
        classes = _class_names(directory / "batches.meta", "label_names")
        train_paths = [directory / f"data_batch_{i}" for i in range(1, 6)]
        test_paths, label_key, name = [directory / "test_batch"], "labels", "cifar10"
    else:
        classes = _class_names(directory / "meta", "fine_label_names")
        train_paths, test_paths, label_key, name = [directory / "train"], [directory / "test"], "fine_labels", "cifar100"
    return DataSplits(_cifar_split(train_paths, label_key, classes, name),
                      _cifar_split(test_paths, label_key, classes, name))


# --------------------------------------------------------------------------- image folders

def _split_dir(root: Path, split: str) -> Path:
    """``root/split`` or Intel's ``root/seg_split``; descends a doubled ``seg_train/seg_train`` (Kaggle's zip)."""
    for name in (split, f"seg_{split}"):
        candidate = root / name
        if candidate.is_dir():
            nested = candidate / name
            subdirs = [p for p in candidate.iterdir() if p.is_dir() and not p.name.startswith(".")]
            return nested if subdirs == [nested] else candidate
    raise MissingDataError(f"{root}: no '{split}' (or 'seg_{split}') subfolder")


def _list_folder(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DatasetError(f"{split_dir}: no class folders (expected one subfolder per class)")
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir()
                       if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{split_dir / cls}: class folder holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        samples.extend((f, label) for f in files)
    return classes, samples


def _bomb_error(path: Path, what: str, limit: int | None) -> DatasetError:
    """The error for an image over Pillow's pixel limit: names the file and how to allow it if intended."""
    return DatasetError(
        f"{path}: {what}, over PIL.Image.MAX_IMAGE_PIXELS = {limit}: refused as a possible decompression bomb "
        "(a small file that decodes to gigabytes). If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS "
        "(None disables the check) before loading; --image-size does not help, images are decoded at full "
        "size before they are resized")


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only; pixels are decoded by convert()
            # Pillow raises DecompressionBombError above 2x MAX_IMAGE_PIXELS but only warns
            # between 1x and 2x, then decodes hundreds of megabytes per image. Checking the
            # size here makes both an error naming the file. Turning the warning into an error
            # with a warnings filter instead would change process-wide state from worker
            # threads (filters are global, catch_warnings is not thread-safe), so Pillow's
            # own warning may still be printed just before this error.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise _bomb_error(path, f"image is {img.width}x{img.height} = {img.width * img.height} pixels", limit)
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                # Pillow's bilinear filter widens its support when downscaling (antialiased).
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.array(img, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    except DatasetError:
        raise  # ours (a ValueError), already complete: not "unreadable"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Raised inside Image.open before the size is ours to read: above 2x the limit, or
        # between 1x and 2x when the caller runs with warnings as errors (-W error). Pillow's
        # message gives the pixel count only.
        raise _bomb_error(path, f"image is too large (Pillow: {str(e).rstrip('.')})", Image.MAX_IMAGE_PIXELS) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def _decode_all(samples: list[tuple[Path, int]], size: tuple[int, int] | None,
                first: np.ndarray | None) -> torch.Tensor:
    """Decode into one preallocated tensor; Pillow releases the GIL while decoding, so threads help."""
    if first is None:
        first = _decode(samples[0][0], size)
    h, w = first.shape[:2]
    out = torch.empty((len(samples), 3, h, w), dtype=torch.uint8)

    def fill(i: int) -> None:
        path = samples[i][0]
        pixels = _decode(path, size)
        if pixels.shape[:2] != (h, w):
            raise DatasetError(
                f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but earlier ones are {w}x{h}; "
                "pass image_size (--image-size) to resize them all")
        out[i] = torch.from_numpy(pixels).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(samples))))  # list(): re-raises the first error
    return out


def load_image_folder(data_dir: Path | str, image_size: int | tuple[int, int] | None = None,
                      name: str = "folder") -> DataSplits:
    """An ImageFolder-style tree: ``data_dir/{train,test}/<class>/<image>`` (or Intel's ``seg_train``/``seg_test``).

    Images are decoded with Pillow to RGB. Classes are the sorted subfolder
    names and must be the same in both splits.

    Args:
        data_dir: the root holding the split folders.
        image_size: ``(H, W)`` or ``S`` for ``(S, S)`` to resize every image to
            (bilinear, antialiased). Default: no resize; every image must then
            have the first image's size.
        name: the data set name stored on the splits.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise MissingDataError(f"{root}: no such directory")
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    train_dir, test_dir = _split_dir(root, "train"), _split_dir(root, "test")
    train_classes, train_samples = _list_folder(train_dir)
    test_classes, test_samples = _list_folder(test_dir)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DatasetError(
            f"{train_dir} and {test_dir} have different class folders: "
            f"only in train {only_train}, only in test {only_test}")
    first = _decode(train_samples[0][0], size)
    train_images = _decode_all(train_samples, size, first)
    test_images = _decode_all(test_samples, size, None)
    # Without image_size the test images must match the train size exactly (resize would hide a mix-up).
    if size is None and test_images.shape[2:] != train_images.shape[2:]:
        raise DatasetError(f"{test_samples[0][0]}: test images are {tuple(test_images.shape[2:])}, "
                           f"train images {tuple(train_images.shape[2:])}; pass image_size")

    def labels(samples: list[tuple[Path, int]]) -> torch.Tensor:
        return torch.tensor([label for _, label in samples], dtype=torch.int64)

    return DataSplits(ImageDataset(train_images, labels(train_samples), train_classes, name),
                      ImageDataset(test_images, labels(test_samples), test_classes, name))


# --------------------------------------------------------------------------- dispatch

def load_dataset(name: str, data_dir: Path | str | None = None,
                 image_size: int | tuple[int, int] | None = None) -> DataSplits:
    """Load ``fashion_mnist``, ``cifar10``, ``cifar100`` or ``folder`` (``image_size`` applies to ``folder`` only)."""
    key = name.lower().replace("-", "_")
    if key != "folder" and image_size is not None:
        raise ValueError(f"image_size applies to 'folder' data only; resize {name} batches with transforms.resize")
    if key == "fashion_mnist":
        return load_fashion_mnist(data_dir)
    if key in ("cifar10", "cifar100"):
        if data_dir is None:
            raise MissingDataError(f"{name} needs --data-dir (the extracted python version of the data set)")
        return load_cifar(data_dir, 10 if key == "cifar10" else 100)
    if key == "folder":
        if data_dir is None:
            raise MissingDataError("folder data needs --data-dir (a root with train/ and test/ class folders)")
        return load_image_folder(data_dir, image_size)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
