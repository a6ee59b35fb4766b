"""Crash-safe file writes, image-grid helpers and finiteness checks.

The ``atomic_write_*`` functions write into a temporary file in the target's
directory, flush and ``fsync`` it, then ``os.replace`` it onto the target.
``os.replace`` is atomic on POSIX (and on Windows within one volume), so a
reader sees either the old complete file or the new complete file, never a
half-written one.  On any error the temporary file is removed and the error is
re-raised; the target is untouched.

Non-finite numbers (NaN, +-inf) in images or weights raise :class:`NonFiniteError`,
a ``ValueError`` the engine turns into the exit of a non-finite loss (training cannot
go on), rather than a generic error: ``image_grid`` refuses them, and
``check_finite`` names the first non-finite array of a list of weights before they are
checkpointed or exported.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "NonFiniteError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_finite",
    "fsync_dir",
    "image_grid",
    "save_png",
]

_DEFAULT_FILE_MODE = 0o644


class NonFiniteError(ValueError):
    """Non-finite numbers (NaN or +-inf) where only finite ones make sense: generated
    images, weights about to be checkpointed or exported. The message says what holds
    them and how many; training cannot go on from such values."""


def _count_non_finite(a: np.ndarray) -> tuple[int, int]:
    """(NaN count, infinite count) of ``a``."""
    return int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))


def _named_values(values) -> Iterable[tuple[str, Any]]:
    if isinstance(values, Mapping):
        return ((str(k), v) for k, v in values.items())
    return (
        (str(getattr(v, "path", None) or getattr(v, "name", None) or f"#{i}"), v)
        for i, v in enumerate(values)
    )


def check_finite(values: Mapping[str, Any] | Iterable[Any], what: str = "weights") -> None:
    """Raises :class:`NonFiniteError` naming the first array of ``values`` that holds
    NaN or an infinity.

    Args:
        values: ``{name: array}`` (e.g. a checkpoint's arrays) or a sequence of
            arrays or variables (Keras/TF variables are named by ``.path`` or
            ``.name``, plain arrays by their position ``#i``). Integer and boolean
            arrays are skipped (always finite).
        what: What the values are, for the message ("classifier weights").
    """
    for name, value in _named_values(values):
        a = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if a.dtype.kind in "biu":
            continue
        try:
            finite = np.isfinite(a)
        except TypeError:  # strings, objects: nothing to check
            continue
        if not finite.all():
            nan, inf = _count_non_finite(a)
            raise NonFiniteError(
                f"non-finite {what}: {name!r} (shape {tuple(a.shape)}) holds {nan} NaN and {inf} "
                f"infinite values of {a.size}"
            )


def fsync_dir(directory: str | os.PathLike) -> None:
    """Best effort: persist the directory entry created by ``os.replace``."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replaces the file at ``path`` with ``data``.

    Creates the parent directory if it is missing.  The new file keeps the
    permission bits of the file it replaces, or gets ``0o644`` if new.

    Raises:
        TypeError: if ``data`` is not bytes-like.
        OSError: from the file system; the target is then left as it was and
            the temporary file is removed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = _DEFAULT_FILE_MODE

    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replaces the file at ``path`` with ``text`` (no newline translation)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically writes ``obj`` as indented JSON followed by a newline.

    Uses ``json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)``.
    The object is fully encoded before anything is written, so an encoding
    error never touches the file.

    NaN and infinities are not valid JSON: they raise ``ValueError`` rather
    than being written as the non-standard ``NaN`` token.  Callers must pass
    ``None`` for missing values (e.g. above the diagonal of an accuracy
    matrix).  Numpy scalars and arrays are not JSON-serializable either
    (``TypeError``); convert them with ``float()`` / ``.tolist()`` first.

    Raises:
        ValueError: if ``obj`` contains NaN or +-inf floats.
        TypeError: if ``obj`` contains something json cannot encode.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Maps [-1, 1] to [0, 255] (-1 -> 0, 1 -> 255), rounding and clipping."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tiles a batch of images into one ``uint8`` grid image.

    Pixel values are mapped from ``[-1, 1]`` to ``[0, 255]`` by
    ``round((x + 1) * 127.5)`` and clipped, so -1 -> 0, 0 -> 128, 1 -> 255.
    Image ``k`` goes to row ``k // ncols``, column ``k % ncols``; its top-left
    pixel is at ``(pad + row * (H + pad), pad + col * (W + pad))``.

    Args:
        images: ``[N, H, W, C]`` real array, ``N >= 1``, ``C`` in {1, 3},
            values nominally in ``[-1, 1]``.
        ncols: number of grid columns (>= 1); the grid always has ``ncols``
            columns, ``ceil(N / ncols)`` rows.
        pad: pixels of padding between cells and around the border (>= 0).
        pad_value: colour of the padding and of empty cells, given in the same
            ``[-1, 1]`` range as the images and mapped the same way
            (default 1.0 -> 255, white).

    Returns:
        ``uint8`` array of shape
        ``[rows * (H + pad) + pad, ncols * (W + pad) + pad, C]``.

    Raises:
        NonFiniteError: (a ``ValueError``) if a pixel is NaN or infinite; the
            message counts the images holding them and names the first.
        ValueError: on a wrong shape, ``N == 0``, ``ncols < 1``, ``pad < 0`` or a
            NaN ``pad_value``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C in {{1, 3}}, got shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"images must be real numbers, got dtype {images.dtype}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("images is empty (N == 0)")
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1, got {ncols!r}")
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    if math.isnan(float(pad_value)):
        raise ValueError("pad_value is NaN")
    images = images.astype(np.float64)
    finite = np.isfinite(images).reshape(n, -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        nan, inf = _count_non_finite(images)
        raise NonFiniteError(
            f"image grid: {bad.size} of {n} images hold non-finite pixels ({nan} NaN, {inf} "
            f"infinite), the first is image {int(bad[0])}"
        )

    ncols = int(ncols)
    pad = int(pad)
    nrows = -(-n // ncols)
    pixels = _to_uint8(images)
    fill = _to_uint8(np.float64(pad_value))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncols)
        top = pad + r * (h + pad)
        left = pad + col * (w + pad)
        grid[top : top + h, left : left + w] = pixels[k]
    return grid


def save_png(path: str | os.PathLike, image_uint8: np.ndarray) -> None:
    """Encodes ``image_uint8`` as PNG with ``tf.io.encode_png`` and writes it atomically.

    Args:
        path: target file; its parent directory is created if missing.
        image_uint8: ``uint8`` array ``[H, W]`` or ``[H, W, C]`` with ``C`` in
            {1, 2, 3, 4} (grey, grey+alpha, RGB, RGBA).

    Raises:
        ValueError: on a wrong dtype or shape.
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4) or 0 in image.shape:
        raise ValueError(f"image must be [H, W] or [H, W, C] with C in 1..4, got shape {image.shape}")

    import tensorflow as tf  # lazy: importing TF costs ~2 s and ~650 MiB

    data = tf.io.encode_png(image).numpy()
    atomic_write_bytes(path, data)
