"""Local dataset sources: a NumPy ``.npz`` archive and a folder of image files.

Both loaders return a :class:`~dgm_tf.data.sources.RawDataset` (uint8 images
``[N, H, W, C]`` with ``C`` 1 or 3, int64 labels holding the original class ids
``0 .. K-1``) and raise :class:`~dgm_tf.data.sources.DataError`, naming the
file or folder at fault, for every problem with the data.

``npz:<file>`` (:func:`load_npz`), an archive written with ``np.savez`` or
``np.savez_compressed``, in one of two layouts:

* ``x_train``, ``y_train``, ``x_test``, ``y_test``: separate splits;
* ``x``, ``y``: one pool, from which a test split is held out per class
  (:func:`split_test`).

Images are ``[N, H, W]`` (grayscale) or ``[N, H, W, C]`` with ``C`` 1 or 3,
uint8 (other integer dtypes are accepted when all values are in 0..255; float
images are rejected).  Labels are 1-D non-negative integers.  An optional
``class_names`` string array names class ``i`` at entry ``i``; without it the
classes are called ``"0"``, ``"1"``, ... up to the largest label.

``folder:<dir>`` (:func:`load_folder`), image files (.png, .jpg, .jpeg, .bmp,
.gif, any case) in one sub-folder per class, in one of two layouts:

* ``<dir>/<class_name>/<image files>``: one pool, from which a test split is
  held out per class (:func:`split_test`);
* ``<dir>/train/<class_name>/...`` and ``<dir>/test/<class_name>/...``:
  separate splits, used whenever ``<dir>`` has both a ``train`` and a ``test``
  sub-folder.

Class ids number the class folder names in sorted order (as torchvision's
``ImageFolder`` does).  All images must have the same height and width; alpha
channels are dropped and :func:`convert_channels` makes the channel count
uniform.
"""

from __future__ import annotations

import collections
import decimal
import math
import numbers
import os
import pathlib
import re
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from dgm_tf.data.sources import DataError, RawDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "convert_channels",
    "load_folder",
    "load_npz",
    "split_test",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
"""File name extensions :func:`load_folder` reads (compared case-insensitively)."""

_NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_POOL_KEYS = ("x", "y")
_NPZ_LAYOUTS = (
    "'x_train', 'y_train', 'x_test', 'y_test' (separate splits) or 'x', 'y' (one pool, "
    "from which a test split is held out), each optionally with 'class_names'"
)
_NPZ_HOWTO = "e.g. np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
_MAX_NUMERIC_CLASSES = 100_000
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_FOLDER_LAYOUTS = (
    "<dir>/<class_name>/<image files> or <dir>/train/<class_name>/<image files> and "
    "<dir>/test/<class_name>/<image files>"
)
# ITU-R 601-2 luma weights (those of tf.image.rgb_to_grayscale) in units of 1e-4,
# so that the weighted sum and its rounding are exact integer arithmetic.
_LUMA_WEIGHTS_E4 = (2989, 5870, 1140)
_GRAY_CHUNK = 4096  # images converted at a time (bounds the int32 temporaries)


# ------------------------------------------------------------------ arguments


def _check_split_args(test_fraction: float, seed: int) -> None:
    """Raises ValueError unless ``0 < test_fraction < 1`` and ``seed`` is an int >= 0."""
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0 < test_fraction < 1
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_channels(channels: int) -> None:
    """Raises ValueError unless ``channels`` is 0, 1 or 3."""
    if isinstance(channels, bool) or channels not in (0, 1, 3):
        raise ValueError(
            f"channels must be 0 (keep the dataset's), 1 (grayscale) or 3 (RGB), got {channels!r}"
        )


# ------------------------------------------------------------------- channels


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Converts uint8 images to a given number of channels.

    RGB to grayscale uses the ITU-R 601-2 luma weights of
    ``tf.image.rgb_to_grayscale`` (0.2989, 0.5870, 0.1140), rounded half up
    exactly (integer arithmetic) and clipped to 0..255.  Grayscale to RGB
    repeats the channel.  Works in numpy, without TensorFlow.

    Args:
        x: uint8 images ``[N, H, W, C]`` with ``C`` 1 or 3.
        channels: 0 to return ``x`` unchanged, 1 for grayscale, 3 for RGB.

    Returns:
        uint8 ``[N, H, W, channels]`` (``x`` itself when it already has that
        many channels or ``channels`` is 0).

    Raises:
        ValueError: if ``channels`` is not 0, 1 or 3, or ``x`` is not uint8
            ``[N, H, W, C]`` with ``C`` 1 or 3.
    """
    _check_channels(channels)
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.uint8
        or x.ndim != 4
        or x.shape[-1] not in (1, 3)
    ):
        got = f"dtype {x.dtype} shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"convert_channels expects uint8 [N, H, W, C] with C 1 or 3, got {got}")
    if channels == 0 or x.shape[-1] == channels:
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=-1)
    gray = np.empty(x.shape[:-1] + (1,), dtype=np.uint8)
    for start in range(0, len(x), _GRAY_CHUNK):
        chunk = x[start : start + _GRAY_CHUNK].astype(np.int32)
        total = np.full(chunk.shape[:-1], 5000, dtype=np.int32)  # + 0.5: round half up
        for c, weight in enumerate(_LUMA_WEIGHTS_E4):
            total += chunk[..., c] * weight
        gray[start : start + _GRAY_CHUNK, ..., 0] = np.clip(total // 10000, 0, 255)
    return gray


# ------------------------------------------------------------------ test split


def _round_half_up(fraction: float, n: int) -> int:
    """``round-half-up(fraction * n)``, on the decimal value of ``fraction`` as written.

    ``Decimal(repr(0.15)) * 10`` is exactly 1.5 (rounded to 2), where the binary
    product ``0.15 * 10`` may land just below or above the tie.
    """
    product = decimal.Decimal(repr(float(fraction))) * n
    return int(product.to_integral_value(rounding=decimal.ROUND_HALF_UP))


def split_test(
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Holds out a test split from one pool of labelled images, per class.

    For each class ``c`` with ``n`` images, a shuffle seeded with
    ``np.random.default_rng((seed, 2, c))`` picks
    ``round-half-up(test_fraction * n)`` test images, clipped to at least 1
    and at most ``n - 1`` (so each class keeps a training image).  The choice
    for a class depends only on ``seed``, the class id and the images of that
    class (in their pool order), not on the other classes.  Both splits keep
    the pool order.

    Args:
        x: Images (any array with a leading example axis).
        y: 1-D integer class ids, ``len(y) == len(x)``.
        test_fraction: Fraction of each class to hold out, in (0, 1).
        seed: Non-negative integer seed.
        class_names: Optional class names indexed by class id, for messages.
        source: Optional file or folder the pool came from, for messages.

    Returns:
        ``(x_train, y_train, x_test, y_test)``.

    Raises:
        ValueError: if ``test_fraction`` is not in (0, 1), ``seed`` is not a
            non-negative integer, or ``x`` and ``y`` do not match.
        DataError: if a class has a single image (it cannot be in both splits).
    """
    _check_split_args(test_fraction, seed)
    y = np.asarray(y)
    if y.ndim != 1 or not (y.size == 0 or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"y must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"x holds {len(x)} examples but y holds {len(y)}")
    train_parts, test_parts = [], []
    for class_id in np.unique(y):
        members = np.flatnonzero(y == class_id)
        n = len(members)
        if n < 2:
            label = f"class {int(class_id)}"
            if class_names is not None and 0 <= class_id < len(class_names):
                label = f"class {class_names[int(class_id)]!r} (id {int(class_id)})"
            prefix = f"{source}: " if source else ""
            raise DataError(
                f"{prefix}{label} has only 1 image, so a test image cannot be held out while "
                "keeping a training image; add images to that class, remove it, or provide "
                "separate train and test splits"
            )
        n_test = min(max(_round_half_up(test_fraction, n), 1), n - 1)
        order = np.random.default_rng((int(seed), 2, int(class_id))).permutation(n)
        test_parts.append(members[order[:n_test]])
        train_parts.append(members[order[n_test:]])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = np.sort(np.concatenate(train_parts)) if train_parts else empty
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else empty
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ------------------------------------------------------------------------- npz


def _open_npz(path: pathlib.Path):
    """Opens ``path`` with ``np.load(allow_pickle=False)``, checking it is a zip archive."""
    if not path.exists():
        raise DataError(f"{path}: npz file not found")
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory, not an .npz file (for a folder of images use "
            f"'folder:{path}')"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    if head.startswith(_NPY_MAGIC):
        raise DataError(
            f"{path}: is a .npy file holding a single array, not an .npz archive; save the "
            f"images and labels together with {_NPZ_HOWTO} (accepted layouts: {_NPZ_LAYOUTS})"
        )
    if not head.startswith(_ZIP_MAGICS):
        raise DataError(
            f"{path}: not a valid .npz file (it is not a zip archive); create it with "
            f"{_NPZ_HOWTO} or np.savez_compressed"
        )
    try:
        return np.load(path, allow_pickle=False)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated .npz file ({e})") from None


# deflate expands at most 1032:1 (https://zlib.net/zlib_tech.html); other zip
# methods numpy never writes are held to the same bound.
_DEFLATE_MAX_RATIO = 1032


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, header size) of an open .npy stream, or None if its format
    version has no public header reader (numpy then checks the member itself)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        return None
    return tuple(int(d) for d in shape), np.dtype(dtype), member.tell()


def _check_npz_sizes(path: pathlib.Path, keys: Sequence[str]) -> None:
    """Refuses members of the archive that declare more than they can hold, before
    numpy allocates what they declare: an .npy header's shape times item size must
    fit in the member's size, and that size in what its compressed bytes can expand to
    (a forged or damaged file would otherwise exhaust memory with no message)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in keys:
                name = f"{key}.npy" if f"{key}.npy" in names else key
                info = zf.getinfo(name)
                if info.compress_type != zipfile.ZIP_STORED:
                    bound = _DEFLATE_MAX_RATIO * info.compress_size + 4096
                    if info.file_size > bound:
                        raise DataError(
                            f"{path}: array {key!r}: member {name} claims {info.file_size} bytes "
                            f"uncompressed from {info.compress_size} compressed, more than deflate can "
                            "expand to; the file is corrupt"
                        )
                with zf.open(info) as member:
                    header = _npy_header(member)
                if header is None:
                    continue
                shape, dtype, header_size = header
                if dtype.hasobject:
                    continue  # refused when loaded (pickles are never loaded)
                needed = math.prod(shape) * dtype.itemsize
                if header_size + needed > info.file_size:
                    raise DataError(
                        f"{path}: array {key!r} declares shape {shape} of {dtype} ({needed} bytes) but its "
                        f"member {name} holds only {info.file_size - header_size} bytes of data; the file "
                        "is corrupt or truncated"
                    )
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated .npz file ({e})") from None


def _npz_array(npz, path: pathlib.Path, key: str) -> np.ndarray:
    """Reads one array of an open npz archive, translating errors to DataError."""
    try:
        return npz[key]
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise DataError(
                f"{path}: array {key!r} holds pickled Python objects (dtype object), which "
                "are not loaded for safety; store images and labels as numeric arrays and "
                "class_names as a string array, e.g. np.array(names, dtype=str)"
            ) from None
        raise DataError(f"{path}: corrupt array {key!r} ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated .npz file: array {key!r}: {e}") from None
    except MemoryError:
        raise DataError(f"{path}: array {key!r} does not fit in memory") from None


def _npz_keys(path: pathlib.Path, keys: Sequence[str]) -> tuple[str, ...]:
    """Picks the layout's keys from the archive's keys."""
    found = set(keys)
    has_split = all(k in found for k in _NPZ_SPLIT_KEYS)
    has_pool = all(k in found for k in _NPZ_POOL_KEYS)
    if has_split and has_pool:
        raise DataError(
            f"{path}: holds both 'x', 'y' and 'x_train', 'y_train', 'x_test', 'y_test', so it "
            f"is ambiguous which to use; keep one layout (accepted layouts: {_NPZ_LAYOUTS})"
        )
    if has_split:
        return _NPZ_SPLIT_KEYS
    if has_pool:
        return _NPZ_POOL_KEYS
    wanted = _NPZ_SPLIT_KEYS if any(k in found for k in _NPZ_SPLIT_KEYS) else _NPZ_POOL_KEYS
    missing = [k for k in wanted if k not in found]
    raise DataError(
        f"{path}: missing array(s) {', '.join(repr(k) for k in missing)}; found keys "
        f"{sorted(found)}; accepted layouts: {_NPZ_LAYOUTS}"
    )


def _npz_images(a: np.ndarray, path: pathlib.Path, key: str) -> np.ndarray:
    """Validates npz images; returns uint8 ``[N, H, W, C]``."""
    if a.ndim not in (3, 4):
        raise DataError(
            f"{path}: {key!r} must be images [N, H, W] (grayscale) or [N, H, W, C], got "
            f"shape {a.shape}"
        )
    if a.size == 0:
        raise DataError(f"{path}: {key!r} is empty (shape {a.shape}); it must hold images")
    if a.ndim == 4 and a.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: {key!r} has {a.shape[-1]} channels (shape {a.shape}); images must have "
            "1 (grayscale) or 3 (RGB) channels in the last axis, e.g. drop an alpha channel "
            "with x[..., :3]"
        )
    store = "store the images as uint8 with values 0..255"
    if a.dtype.kind == "f":
        lo, hi = np.nanmin(a), np.nanmax(a)
        raise DataError(
            f"{path}: {key!r} has float dtype {a.dtype} with values in [{lo:g}, {hi:g}]; "
            f"{store} (e.g. np.round(x * 255).astype(np.uint8) for values in [0, 1])"
        )
    if a.dtype.kind not in "ui":
        raise DataError(f"{path}: {key!r} has dtype {a.dtype}; {store}")
    if a.dtype != np.uint8:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{path}: {key!r} has dtype {a.dtype} with values in [{lo}, {hi}], outside "
                f"0..255; {store}"
            )
        a = a.astype(np.uint8)
    return a[..., np.newaxis] if a.ndim == 3 else a


def _npz_labels(a: np.ndarray, path: pathlib.Path, key: str) -> np.ndarray:
    """Validates npz labels; returns int64 ``[N]``."""
    if a.ndim != 1 or a.dtype.kind not in "ui":
        raise DataError(
            f"{path}: {key!r} must be a 1-D integer array of class ids, got dtype {a.dtype} "
            f"shape {a.shape}"
        )
    if a.size and a.min() < 0:
        raise DataError(
            f"{path}: {key!r} holds negative label {int(a.min())}; labels must be class ids "
            "0..K-1"
        )
    if a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{path}: {key!r} holds label {int(a.max())}, too large for a class id")
    return a.astype(np.int64)


def _npz_class_names(a: np.ndarray, path: pathlib.Path) -> tuple[str, ...]:
    """Validates the optional ``class_names`` array."""
    if a.ndim != 1 or a.dtype.kind not in "US" or a.size == 0:
        raise DataError(
            f"{path}: 'class_names' must be a non-empty 1-D string array (entry i names "
            f"class i), got dtype {a.dtype} shape {a.shape}"
        )
    try:
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in a.tolist())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: 'class_names' is not valid UTF-8: {e}") from None
    for i, name in enumerate(names):
        if not name.strip():
            raise DataError(f"{path}: 'class_names' entry {i} is empty")
    duplicates = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if duplicates:
        raise DataError(f"{path}: 'class_names' has duplicate names {duplicates}")
    return names


def load_npz(path: str | os.PathLike[str], *, test_fraction: float, seed: int) -> RawDataset:
    """Loads a dataset from a NumPy ``.npz`` archive.

    Accepted layouts (arrays stored under these keys):

    * ``x_train``, ``y_train``, ``x_test``, ``y_test``: separate splits;
    * ``x``, ``y``: one pool; a test split is held out per class with
      :func:`split_test` (``test_fraction``, ``seed``).

    Either layout may add ``class_names``, a 1-D string array whose entry ``i``
    names class ``i``; without it the classes are named ``"0"``, ``"1"``, ...
    up to the largest label.  Other keys are ignored.

    Images are ``[N, H, W]`` (grayscale) or ``[N, H, W, C]`` with ``C`` 1 or
    3, of dtype uint8; other integer dtypes are accepted (and cast) when every
    value is in 0..255.  Labels are 1-D non-negative integer class ids.  The
    archive is read with ``allow_pickle=False``.

    Args:
        path: The ``.npz`` file (``~`` is expanded).
        test_fraction: Fraction of each class held out for test in the
            ``x, y`` layout, in (0, 1).  Checked for every layout.
        seed: Non-negative seed of the held-out split.

    Returns:
        The dataset, named ``"npz:<path>"``.

    Raises:
        ValueError: for a bad ``test_fraction`` or ``seed``.
        DataError: naming the file, if it is missing, not a readable npz
            archive, holds pickled objects, lacks the arrays of a layout
            (the message lists the keys found), or holds bad arrays: float or
            out-of-range images, wrong shapes or channel counts, empty arrays,
            images and labels of different lengths, non-integer, negative or
            out-of-range labels, train and test images of different sizes, or
            a class with a single image in the ``x, y`` layout.
    """
    _check_split_args(test_fraction, seed)
    path = pathlib.Path(os.path.expanduser(os.fspath(path)))
    with _open_npz(path) as npz:
        layout = _npz_keys(path, npz.files)
        _check_npz_sizes(path, [*layout, *(["class_names"] if "class_names" in npz.files else [])])
        raw = {key: _npz_array(npz, path, key) for key in layout}
        names_array = _npz_array(npz, path, "class_names") if "class_names" in npz.files else None

    splits = {}
    for x_key, y_key in zip(layout[0::2], layout[1::2]):
        x = _npz_images(raw[x_key], path, x_key)
        y = _npz_labels(raw[y_key], path, y_key)
        if len(x) != len(y):
            raise DataError(
                f"{path}: {x_key!r} holds {len(x)} images but {y_key!r} holds {len(y)} labels"
            )
        splits[x_key] = (x, y)
    if layout == _NPZ_SPLIT_KEYS:
        (x_train, y_train), (x_test, y_test) = splits["x_train"], splits["x_test"]
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(
                f"{path}: 'x_train' images are {x_train.shape[1:]} but 'x_test' images are "
                f"{x_test.shape[1:]} (H, W, C); train and test images must have the same size"
            )

    max_label = max(int(y.max()) for _, y in splits.values())
    if names_array is not None:
        class_names = _npz_class_names(names_array, path)
        for y_key, (_, y) in zip(layout[1::2], splits.values()):
            if int(y.max()) >= len(class_names):
                raise DataError(
                    f"{path}: {y_key!r} holds label {int(y.max())} but 'class_names' names only "
                    f"{len(class_names)} classes (ids 0..{len(class_names) - 1})"
                )
    else:
        if max_label >= _MAX_NUMERIC_CLASSES:
            raise DataError(
                f"{path}: label {max_label} is too large; labels must be class ids 0..K-1 "
                "(remap sparse ids, e.g. with np.unique(y, return_inverse=True))"
            )
        class_names = tuple(str(i) for i in range(max_label + 1))

    if layout == _NPZ_POOL_KEYS:
        x, y = splits["x"]
        x_train, y_train, x_test, y_test = split_test(
            x, y, test_fraction, seed, class_names=class_names, source=str(path)
        )
    return RawDataset(
        name=f"npz:{path}",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
    )


# ---------------------------------------------------------------------- folder


def _class_dirs(directory: pathlib.Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``directory``."""
    try:
        entries = list(directory.iterdir())
    except OSError as e:
        raise DataError(f"{directory}: cannot list folder: {e.strerror or e}") from None
    return sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
    """Sorted image files of a class folder; raises DataError if there are none."""
    try:
        entries = list(class_dir.iterdir())
    except OSError as e:
        raise DataError(f"{class_dir}: cannot list folder: {e.strerror or e}") from None
    files = sorted(
        p
        for p in entries
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DataError(
            f"{class_dir}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            "add images to it or remove it"
        )
    return files


def _tf_message(e: Exception) -> str:
    """The useful part of a TensorFlow op error message."""
    text = getattr(e, "message", None) or str(e)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text, flags=re.S)
    return text.strip() or type(e).__name__


class _ImageReader:
    """Decodes image files, checking that sizes (and, for channels=0, channel counts) agree."""

    def __init__(self, channels: int):
        import tensorflow as tf  # deferred: importing TensorFlow takes seconds

        self._tf = tf
        self._channels = channels
        self._first: pathlib.Path | None = None
        self._size: tuple[int, int] | None = None
        self._first_by_channels: dict[int, pathlib.Path] = {}

    def read(self, file: pathlib.Path) -> np.ndarray:
        """Returns the image of ``file`` as uint8 ``[H, W, C]``."""
        tf = self._tf
        try:
            image = tf.io.decode_image(
                tf.io.read_file(str(file)), expand_animations=False, dtype=tf.uint8
            ).numpy()
        except tf.errors.OpError as e:
            raise DataError(
                f"{file}: cannot decode image ({_tf_message(e)}); the file is corrupt or not "
                "an image: fix, replace or remove it"
            ) from None
        if image.shape[-1] in (2, 4):  # gray+alpha, RGBA: drop alpha
            image = image[..., :-1]
        size = (int(image.shape[0]), int(image.shape[1]))
        if self._size is None:
            self._first, self._size = file, size
        elif size != self._size:
            raise DataError(
                f"{file}: image is {size[0]}x{size[1]} (height x width) but the first image "
                f"read, {self._first}, is {self._size[0]}x{self._size[1]}; all images must "
                "have the same size: resize them beforehand"
            )
        c = int(image.shape[-1])
        self._first_by_channels.setdefault(c, file)
        if self._channels == 0:
            if len(self._first_by_channels) > 1:
                gray, rgb = self._first_by_channels[1], self._first_by_channels[3]
                raise DataError(
                    f"the images mix grayscale and color: {gray} is grayscale but {rgb} is "
                    "RGB; pass --channels=1 to convert all to grayscale or --channels=3 to "
                    "convert all to RGB"
                )
            return image
        return convert_channels(image[np.newaxis], self._channels)[0]


def _read_classes(
    reader: _ImageReader, split_dir: pathlib.Path, class_names: Sequence[str],
    present: Sequence[str],
) -> tuple[list[np.ndarray], list[int]]:
    """Reads the images of the class folders ``present`` in ``split_dir``."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    ids = {name: i for i, name in enumerate(class_names)}  # not list.index: O(K) per class
    for name in present:
        class_id = ids[name]
        for file in _image_files(split_dir / name):
            images.append(reader.read(file))
            labels.append(class_id)
    return images, labels


def load_folder(
    directory: str | os.PathLike[str], *, channels: int, test_fraction: float, seed: int
) -> RawDataset:
    """Loads a dataset from a folder of image files, one sub-folder per class.

    Accepted layouts:

    * ``<dir>/<class_name>/<image files>``: one pool; a test split is held
      out per class with :func:`split_test` (``test_fraction``, ``seed``).
    * ``<dir>/train/<class_name>/...`` and ``<dir>/test/<class_name>/...``:
      separate splits.  Used whenever ``<dir>`` has both a ``train`` and a
      ``test`` sub-folder (other sub-folders of ``<dir>``, e.g. ``val``, are
      then ignored).  The classes are the ``train`` class folders; a test
      class folder must have a train counterpart, but a class may lack a test
      folder.

    Class ids number the class folder names in sorted order, and the class
    names are the folder names.  Image files are those with extension .png,
    .jpg, .jpeg, .bmp or .gif (any case) directly inside a class folder, read
    in sorted order with ``tf.io.decode_image`` (first frame of an animated
    GIF); other files, hidden files and hidden folders are ignored.  All
    images must have the same height and width.  An alpha channel is dropped.

    Args:
        directory: The dataset folder (``~`` is expanded).
        channels: 0 keeps the images' channels (they must then all be
            grayscale or all RGB), 1 converts to grayscale, 3 to RGB (see
            :func:`convert_channels`).
        test_fraction: Fraction of each class held out for test in the
            one-pool layout, in (0, 1).  Checked for every layout.
        seed: Non-negative seed of the held-out split.

    Returns:
        The dataset, named ``"folder:<directory>"``.

    Raises:
        ValueError: for a bad ``channels``, ``test_fraction`` or ``seed``.
        DataError: naming the folder or file at fault: missing folder, no
            class sub-folders, a class folder without image files, a test
            class unknown to train, an undecodable image, images of different
            sizes, grayscale and RGB images mixed with ``channels=0``, or a
            class with a single image in the one-pool layout.
    """
    _check_channels(channels)
    _check_split_args(test_fraction, seed)
    directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    if not directory.exists():
        raise DataError(f"{directory}: image folder does not exist")
    if not directory.is_dir():
        raise DataError(f"{directory}: is not a folder (expected {_FOLDER_LAYOUTS})")
    subdirs = _class_dirs(directory)
    if not subdirs:
        raise DataError(f"{directory}: no class sub-folders (expected {_FOLDER_LAYOUTS})")

    reader = _ImageReader(channels)
    if "train" in subdirs and "test" in subdirs:
        train_dir, test_dir = directory / "train", directory / "test"
        class_names = tuple(_class_dirs(train_dir))
        if not class_names:
            raise DataError(
                f"{train_dir}: no class sub-folders (expected {train_dir}/<class_name>/<image "
                "files>)"
            )
        test_classes = _class_dirs(test_dir)
        if not test_classes:
            raise DataError(
                f"{test_dir}: no class sub-folders (expected {test_dir}/<class_name>/<image "
                "files>)"
            )
        known = set(class_names)
        unknown = [name for name in test_classes if name not in known]
        if unknown:
            raise DataError(
                f"{test_dir}: class folder(s) {unknown} have no counterpart in {train_dir}; "
                "every test class needs training images (rename or add the train folder)"
            )
        train_images, train_labels = _read_classes(reader, train_dir, class_names, class_names)
        test_images, test_labels = _read_classes(reader, test_dir, class_names, test_classes)
        x_train, y_train = np.stack(train_images), np.array(train_labels, dtype=np.int64)
        x_test, y_test = np.stack(test_images), np.array(test_labels, dtype=np.int64)
    else:
        class_names = tuple(subdirs)
        images, labels = _read_classes(reader, directory, class_names, class_names)
        x, y = np.stack(images), np.array(labels, dtype=np.int64)
        del images
        x_train, y_train, x_test, y_test = split_test(
            x, y, test_fraction, seed, class_names=class_names, source=str(directory)
        )
    return RawDataset(
        name=f"folder:{directory}",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
    )
