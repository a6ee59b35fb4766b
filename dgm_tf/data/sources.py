"""Dataset sources: the packaged Fashion-MNIST sample and MNIST-format IDX folders.

Every source returns a :class:`RawDataset`: uint8 images ``[N, H, W, C]`` and
int64 labels holding the dataset's *original* class ids.  Turning that into a
class-incremental benchmark is the job of :mod:`dgm_tf.data.scenario`.

Supported dataset specs (see :func:`load_dataset`; ``npz:``/``folder:`` live in
:mod:`dgm_tf.data.files`, ``tfds:`` in :mod:`dgm_tf.data.tfds_source`):

* ``embedded`` (or ``embedded:fashion_mnist``): a class-balanced subset of
  Fashion-MNIST shipped inside the package (600 train and 200 test images per
  class), so that tests and quick runs need neither network nor downloads.
* ``idx:<dir>``: the four MNIST-format IDX files (plain or gzipped) in
  ``<dir>``, e.g. the Debian ``dataset-fashion-mnist`` package's
  ``/usr/share/datasets/fashion-mnist``.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte
magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimension sizes, then the data in C order, big-endian.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import math
import os
import pathlib
import types
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "CLASS_NAMES_FILE",
    "DataError",
    "EMBEDDED_NAME",
    "FASHION_MNIST_CLASS_NAMES",
    "IDX_FILE_NAMES",
    "RawDataset",
    "load_dataset",
    "load_embedded",
    "load_idx_dir",
    "read_idx",
]

FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST class names, indexed by label (zalandoresearch/fashion-mnist README)."""

EMBEDDED_NAME = "embedded:fashion_mnist"
"""``RawDataset.name`` of the packaged sample."""

_EMBEDDED_DIR = "embedded"
_EMBEDDED_FILE = "fashion_mnist_sample.npz"

IDX_FILE_NAMES: Mapping[str, str] = types.MappingProxyType(
    {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
)
"""Base names of the four IDX files; each may also carry a ``.gz`` suffix."""

CLASS_NAMES_FILE = "class_names.txt"
"""Optional file in an IDX folder: one class name per line, line i names label i."""

# IDX type byte -> numpy dtype (all multi-byte types are big-endian on disk).
_IDX_DTYPES: Mapping[int, np.dtype] = types.MappingProxyType(
    {
        0x08: np.dtype(np.uint8),
        0x09: np.dtype(np.int8),
        0x0B: np.dtype(">i2"),
        0x0C: np.dtype(">i4"),
        0x0D: np.dtype(">f4"),
        0x0E: np.dtype(">f8"),
    }
)
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A user-facing data problem.

    The message names the file, flag or dataset spec at fault and says what is
    wrong with it, so it can be shown to the user as is.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class RawDataset:
    """A labelled image dataset with a train and a test split.

    Construction validates the arrays (raising :class:`DataError`) and converts
    integer labels of any integer dtype to int64.  ``eq=False``: instances
    compare and hash by identity, since element-wise array equality has no
    single truth value.

    Attributes:
        name: Where the data came from, e.g. ``"embedded:fashion_mnist"`` or
            ``"idx:/path/to/dir"``.
        x_train: uint8 ``[N, H, W, C]`` training images (``C=1`` for grayscale).
        y_train: int64 ``[N]`` original class ids of the training images.
        x_test: uint8 ``[M, H, W, C]`` test images.
        y_test: int64 ``[M]`` original class ids of the test images.
        class_names: Class names indexed by original class id.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.class_names)
        if not names:
            raise DataError(f"{self.name}: no class names")
        object.__setattr__(self, "class_names", names)
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(
                    f"{self.name}: x_{split} must be a uint8 array [N, H, W, C], got "
                    f"{_describe(x)}"
                )
            y = np.asarray(y)
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise DataError(
                    f"{self.name}: y_{split} must be a 1-D integer array, got {_describe(y)}"
                )
            if len(y) != len(x):
                raise DataError(
                    f"{self.name}: {len(x)} {split} images but {len(y)} {split} labels"
                )
            if y.size and (y.min() < 0 or y.max() >= len(names)):
                bad = int(y.min()) if y.min() < 0 else int(y.max())
                raise DataError(
                    f"{self.name}: {split} label {bad} is out of range for "
                    f"{len(names)} class names"
                )
            object.__setattr__(self, f"y_{split}", y.astype(np.int64, copy=False))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {self.x_train.shape[1:]} but test images "
                f"are {self.x_test.shape[1:]} (H, W, C)"
            )

    def __repr__(self) -> str:
        return (
            f"RawDataset(name={self.name!r}, train={self.x_train.shape}, "
            f"test={self.x_test.shape}, classes={len(self.class_names)})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images."""
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of class names (original class ids are ``0 .. num_classes-1``)."""
        return len(self.class_names)


def _describe(a: object) -> str:
    """Short description of an array-like for error messages."""
    if isinstance(a, np.ndarray):
        return f"dtype {a.dtype} shape {a.shape}"
    return type(a).__name__


# --------------------------------------------------------------------------- IDX


def _read_file(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None


class _Gunzip:
    """Stream-decompresses gzip data (one or more members) on demand, so that no more
    is inflated than the caller asks for: the IDX header says how much to expect, and a
    gzip bomb (a small file inflating to gigabytes) is stopped at that size."""

    _STEP = 1 << 20  # output produced per zlib call

    def __init__(self, path: pathlib.Path, compressed: bytes):
        self.path = path
        self.output = bytearray()
        self._input = memoryview(compressed)
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.ended = False  # every member inflated completely

    def fill(self, size: int) -> bytearray:
        """Inflates until ``output`` holds ``size`` bytes or the data ends."""
        try:
            while len(self.output) < size and not self.ended:
                room = min(size - len(self.output), self._STEP)
                if self._d.eof:  # a member ended: another one, or the end
                    rest = self._d.unused_data.lstrip(b"\0")  # zero padding between members, as gzip
                    if not rest:
                        self.ended = True
                        break
                    if rest[:2] != _GZIP_MAGIC:
                        raise DataError(f"{self.path}: corrupt gzip data: garbage after the compressed data")
                    self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._input = memoryview(rest)
                chunk = self._d.decompress(self._input, room)
                self._input = memoryview(self._d.unconsumed_tail)
                self.output += chunk
                if not chunk and not self._input and not self._d.eof:
                    raise DataError(
                        f"{self.path}: corrupt or truncated gzip data: the file ends before the end of "
                        "the compressed stream"
                    )
        except zlib.error as e:
            raise DataError(f"{self.path}: corrupt or truncated gzip data: {e}") from None
        return self.output


# deflate expands at most 1032:1 (zlib's technical limit: a 258-byte match per
# 2-bit code, https://zlib.net/zlib_tech.html), so a gzip file of n bytes cannot
# hold more than about 1032 n.
_DEFLATE_MAX_RATIO = 1032


def _max_inflated(compressed_size: int) -> int:
    return _DEFLATE_MAX_RATIO * compressed_size + 4096


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file, plain or gzip-compressed.

    Memory stays bounded by what the file can hold: a plain file's header must
    account for its size exactly, a gzip file is inflated only up to the size its
    header declares (plus one byte, to see trailing data), and a header declaring more
    than deflate can expand the compressed bytes to is refused before inflating.

    Args:
        path: The file.  Gzip compression is detected from the content, not the
            name.

    Returns:
        A new, writable array in native byte order with the shape and dtype the
        header declares.

    Raises:
        DataError: naming the file, if it is missing or unreadable, is not gzip
            or IDX (bad magic number), holds fewer bytes than its header
            promises (truncated) or more (trailing garbage), or is gzip data
            whose header declares more than it can hold.
    """
    path = pathlib.Path(path)
    raw = _read_file(path)
    # An IDX file always starts with two zero bytes, so the gzip magic is unambiguous.
    gz = _Gunzip(path, raw) if raw[:2] == _GZIP_MAGIC else None

    def head(n: int):
        return gz.fill(n) if gz is not None else raw

    data = head(4)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, shorter than the 4-byte magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: not an IDX file: wrong magic number 0x{magic:08X} (expected "
            "0x0000TTDD with TT a type code and DD the number of dimensions, e.g. "
            "0x00000803 for images, 0x00000801 for labels)"
        )
    header_size = 4 + 4 * ndim
    data = head(header_size)
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, shorter than its "
            f"{header_size}-byte header"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(shape)
    expected = header_size + count * dtype.itemsize
    if gz is not None and expected > _max_inflated(len(raw)):
        raise DataError(
            f"{path}: corrupt IDX file: the header declares shape {shape} ({expected} bytes) but "
            f"{len(raw)} bytes of gzip data cannot hold more than {_max_inflated(len(raw))} "
            "(a damaged header or a decompression bomb)"
        )
    data = head(expected + 1)  # one more: is there anything after the data?
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated IDX file: the header promises shape {shape} "
            f"({expected} bytes with the header) but there are only {len(data)} bytes"
        )
    if len(data) > expected:
        extra = f"{len(data) - expected} bytes" if gz is None else "data"
        raise DataError(
            f"{path}: corrupt IDX file: {extra} after the {shape} data the header declares"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header_size).reshape(shape)
    if gz is not None and dtype.isnative:
        return array  # over the inflated bytearray: already a new, writable array
    return array.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: pathlib.Path, base: str) -> pathlib.Path:
    """Finds ``base`` or ``base.gz`` in ``directory``.

    Also accepts the ``train-images.idx3-ubyte`` spelling some mirrors use.
    """
    alt = base.replace("-idx", ".idx")
    candidates = [base, base + ".gz", alt, alt + ".gz"]
    for name in dict.fromkeys(candidates):  # de-duplicated, order kept
        path = directory / name
        if path.is_file():
            return path
    raise DataError(f"{directory}: missing IDX file {base} (or {base}.gz)")


def _read_images(path: pathlib.Path) -> np.ndarray:
    """Reads an IDX image file as uint8 ``[N, H, W, C]``."""
    x = read_idx(path)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DataError(
            f"{path}: expected unsigned-byte images with 3 dimensions [N, H, W] (or 4 with "
            f"channels), got dtype {x.dtype} shape {x.shape}"
        )
    if x.ndim == 4 and x.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: images have {x.shape[-1]} channels (shape {x.shape}); they must have 1 "
            "(grayscale) or 3 (RGB) channels in the last dimension"
        )
    return x[..., np.newaxis] if x.ndim == 3 else x


def _read_labels(path: pathlib.Path) -> np.ndarray:
    """Reads an IDX label file as int64 ``[N]``."""
    y = read_idx(path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: expected 1-D integer labels, got dtype {y.dtype} shape {y.shape}"
        )
    if y.size and y.min() < 0:
        raise DataError(f"{path}: negative label {int(y.min())}")
    return y.astype(np.int64)


def _read_class_names_file(path: pathlib.Path) -> tuple[str, ...]:
    """Reads ``class_names.txt``: one non-empty, unique name per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read class names: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names:
        raise DataError(f"{path}: no class names (expected one name per line)")
    for i, name in enumerate(names):
        if not name:
            raise DataError(f"{path}: line {i + 1} is empty (expected one name per line)")
    duplicates = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if duplicates:
        raise DataError(f"{path}: duplicate class names {duplicates}")
    return names


def load_idx_dir(directory: str | os.PathLike[str]) -> RawDataset:
    """Loads the four MNIST-format IDX files of a folder.

    Class names come from ``class_names.txt`` in the folder if present;
    otherwise the ten Fashion-MNIST names if the path contains "fashion"
    (any case); otherwise the label ids as strings (``"0"``, ``"1"``, ...,
    at least ten, more if the labels go higher).

    Raises:
        DataError: naming the folder or file at fault (missing folder or file,
            bad IDX file, images and labels of different counts, train and test
            images of different sizes, labels out of range of the class names).
    """
    directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    if not directory.exists():
        raise DataError(f"{directory}: IDX dataset directory does not exist")
    if not directory.is_dir():
        raise DataError(f"{directory}: IDX dataset path is not a directory")
    paths = {key: _find_idx_file(directory, base) for key, base in IDX_FILE_NAMES.items()}

    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        x = _read_images(images_path)
        y = _read_labels(labels_path)
        if len(x) != len(y):
            raise DataError(
                f"{images_path} holds {len(x)} images but {labels_path} holds {len(y)} labels"
            )
        splits[split] = (x, y)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{paths['train_images']} holds {x_train.shape[1:]} images but "
            f"{paths['test_images']} holds {x_test.shape[1:]} images (H, W, C)"
        )

    names_path = directory / CLASS_NAMES_FILE
    max_label = max([int(y.max()) for y in (y_train, y_test) if y.size], default=0)
    if names_path.is_file():
        class_names = _read_class_names_file(names_path)
        names_source = str(names_path)
    elif "fashion" in str(directory).lower() or "fashion" in str(directory.resolve()).lower():
        class_names = FASHION_MNIST_CLASS_NAMES
        names_source = "the Fashion-MNIST class names (path contains 'fashion')"
    else:
        class_names = tuple(str(i) for i in range(max(10, max_label + 1)))
        names_source = "numeric class names"
    for split in ("train", "test"):
        y = splits[split][1]
        if y.size and y.max() >= len(class_names):
            raise DataError(
                f"{paths[f'{split}_labels']}: label {int(y.max())} is out of range for the "
                f"{len(class_names)} classes of {names_source}"
            )
    return RawDataset(
        name=f"idx:{directory}",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
    )


# ---------------------------------------------------------------------- embedded


def load_embedded() -> RawDataset:
    """Loads the Fashion-MNIST sample packaged in ``dgm_tf/data/embedded``.

    Read through :mod:`importlib.resources`, so it works from an installed
    (non-editable) package as long as the ``.npz`` is included as package data.
    See ``embedded/PROVENANCE.md`` for its origin and licence.
    """
    package = __package__ or __name__.rpartition(".")[0]
    resource = importlib.resources.files(package).joinpath(_EMBEDDED_DIR).joinpath(
        _EMBEDDED_FILE
    )
    regenerate = "regenerate it with tools/make_embedded_data.py"
    if not resource.is_file():
        raise DataError(f"{resource}: the embedded dataset is missing; {regenerate}")
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {
                k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test", "class_names")
            }
    except (OSError, ValueError, KeyError, zlib.error) as e:
        raise DataError(
            f"{resource}: cannot read the embedded dataset ({e}); {regenerate}"
        ) from None
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    return RawDataset(
        name=EMBEDDED_NAME,
        x_train=x_train[..., np.newaxis] if x_train.ndim == 3 else x_train,
        y_train=arrays["y_train"],
        x_test=x_test[..., np.newaxis] if x_test.ndim == 3 else x_test,
        y_test=arrays["y_test"],
        class_names=tuple(str(n) for n in arrays["class_names"]),
    )


# -------------------------------------------------------------------- dispatcher

_SUPPORTED_SPECS: Sequence[str] = (
    "'embedded' (the Fashion-MNIST sample packaged with dgm_tf)",
    "'idx:<dir>' (MNIST-format IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte in <dir>, each plain or .gz)",
    "'npz:<file>' (arrays x, y, or x_train, y_train, x_test, y_test; optional class_names)",
    "'folder:<dir>' (one sub-folder of images per class, or train/ and test/ with one each)",
    "'tfds:<name>' (a TensorFlow Datasets builder, e.g. tfds:mnist, tfds:svhn_cropped, "
    "tfds:cifar10, tfds:imagenet_resized/32x32; see --data_dir and --download)",
)


def load_dataset(
    spec: str,
    *,
    data_dir: str = "",
    download: bool = False,
    channels: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    select: Callable[[Sequence[int]], Sequence[int]] | None = None,
) -> RawDataset:
    """Loads a dataset from a spec string.

    Args:
        spec: ``"embedded"`` (also ``"embedded:fashion_mnist"``), ``"idx:<dir>"``,
            ``"npz:<file>"``, ``"folder:<dir>"`` or ``"tfds:<name>"``.
        data_dir: tfds only: where prepared datasets live ("" = TFDS's default).
        download: tfds only: allow downloading (otherwise fail fast when absent).
        channels: 0 keeps the stored channels, 1 converts to grayscale, 3 to RGB.
        test_fraction: Per-class test share for sources without a test split
            (``npz`` with ``x, y``; ``folder`` without ``train/`` and ``test/``).
        seed: Seed of that test split.
        select: Given the dataset's class ids, the ones that will be used. Sources
            that can skip data while reading (tfds) read only those; the others
            load everything (the scenario picks the classes).

    Returns:
        The dataset with uint8 ``[N, H, W, C]`` images and int64 labels.

    Raises:
        DataError: for an unsupported spec (the message lists the supported
            forms) or a problem with the data (the message names the file).
    """
    if not isinstance(spec, str):
        raise DataError(f"dataset spec must be a string, got {type(spec).__name__}")
    if channels not in (0, 1, 3):
        raise DataError(f"--channels must be 0 (as stored), 1 or 3, got {channels}")
    text = spec.strip()
    kind, _, arg = text.partition(":")
    arg = arg.strip()
    if text in ("embedded", EMBEDDED_NAME):
        raw = load_embedded()
    elif kind in ("idx", "npz", "folder", "tfds") and not arg:
        what = {"tfds": "a builder name", "npz": "a file"}.get(kind, "a directory")
        raise DataError(f"dataset spec {spec!r}: '{kind}:' must be followed by {what}")
    elif kind == "idx":
        raw = load_idx_dir(arg)
    elif kind == "npz":
        from dgm_tf.data.files import load_npz

        raw = load_npz(os.path.expanduser(arg), test_fraction=test_fraction, seed=seed)
    elif kind == "folder":
        from dgm_tf.data.files import load_folder

        return load_folder(os.path.expanduser(arg), channels=channels, test_fraction=test_fraction, seed=seed)
    elif kind == "tfds":
        from dgm_tf.data.tfds_source import load_tfds

        raw = load_tfds(arg, data_dir=os.path.expanduser(data_dir), download=download, select=select)
    else:
        raise DataError(
            f"unsupported dataset spec {spec!r}; supported forms: " + "; ".join(_SUPPORTED_SPECS)
        )
    return with_channels(raw, channels)


def with_channels(raw: RawDataset, channels: int) -> RawDataset:
    """``raw`` with its images converted to ``channels`` (0: unchanged)."""
    from dgm_tf.data.files import convert_channels

    if channels == 0 or raw.image_shape[-1] == channels:
        return raw
    return dataclasses.replace(
        raw,
        x_train=convert_channels(raw.x_train, channels),
        x_test=convert_channels(raw.x_test, channels),
    )
