"""Builds the Fashion-MNIST sample packaged as dgm_tf/data/embedded/fashion_mnist_sample.npz.

Reads the Fashion-MNIST IDX files (by default those of the Debian package
``dataset-fashion-mnist``) through ``dgm_tf.data.sources``, keeps a
class-balanced subset and writes it as a compressed ``.npz``.

Selection: for each class c and split s, the indices of that class are shuffled
with ``np.random.default_rng((seed, s, c))`` (s = 0 for train, 1 for test) and
the first ``--train_per_class`` / ``--test_per_class`` are kept; the kept
indices are then sorted, so the sample keeps the source files' order.

The output is byte-for-byte reproducible for a given zlib: the zip entries get
a fixed timestamp, fixed permissions and a fixed order.

Usage (from the repository root)::

    python3 tools/make_embedded_data.py \
        --source_dir /usr/share/datasets/fashion-mnist \
        --output dgm_tf/data/embedded/fashion_mnist_sample.npz \
        --train_per_class 600 --test_per_class 200 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import sys
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(_REPO_ROOT) not in sys.path:
    # Run as a script from a source checkout: make ``dgm_tf`` importable.
    sys.path.insert(0, str(_REPO_ROOT))

from dgm_tf.data import sources  # noqa: E402

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUTPUT = _REPO_ROOT / "dgm_tf" / "data" / "embedded" / "fashion_mnist_sample.npz"
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # earliest date a zip entry can hold
_TRAIN_STREAM, _TEST_STREAM = 0, 1


def select_per_class(
    labels: np.ndarray, per_class: int, *, seed: int, stream: int
) -> np.ndarray:
    """Sorted indices of the first ``per_class`` examples of every class after a seeded shuffle.

    Raises:
        ValueError: if a class has fewer than ``per_class`` examples.
    """
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {c} has {idx.size} examples, fewer than {per_class}")
        rng = np.random.default_rng((seed, stream, int(c)))
        chosen.append(idx[rng.permutation(idx.size)[:per_class]])
    return np.sort(np.concatenate(chosen))


def build_sample(
    raw: sources.RawDataset, *, train_per_class: int, test_per_class: int, seed: int
) -> dict[str, np.ndarray]:
    """The arrays of the sample, in the order they are written."""
    train = select_per_class(raw.y_train, train_per_class, seed=seed, stream=_TRAIN_STREAM)
    test = select_per_class(raw.y_test, test_per_class, seed=seed, stream=_TEST_STREAM)
    return {
        "x_train": raw.x_train[train, ..., 0],  # [N, 28, 28]; the loader adds the channel axis
        "y_train": raw.y_train[train].astype(np.int64),
        "x_test": raw.x_test[test, ..., 0],
        "y_test": raw.y_test[test].astype(np.int64),
        "class_names": np.array(raw.class_names, dtype=np.str_),
        # Positions in the source IDX files, for provenance.
        "train_source_index": train.astype(np.int32),
        "test_source_index": test.astype(np.int32),
    }


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A deflate-compressed ``.npz`` (readable by ``np.load``) with reproducible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, array in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return buffer.getvalue()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR,
                        help="folder with the Fashion-MNIST IDX files (plain or .gz)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="the .npz to write")
    parser.add_argument("--train_per_class", type=int, default=600)
    parser.add_argument("--test_per_class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_per_class < 1 or args.test_per_class < 1:
        parser.error("--train_per_class and --test_per_class must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Builds and writes the sample; prints its size and sha256."""
    args = parse_args(argv)
    try:
        raw = sources.load_idx_dir(args.source_dir)
        arrays = build_sample(
            raw,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
        )
    except (sources.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = npz_bytes(arrays)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(output)
    print(f"wrote {output}: {len(arrays['y_train'])} train + {len(arrays['y_test'])} test images, "
          f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
