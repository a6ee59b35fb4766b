"""TensorFlow Datasets as a source: ``tfds:<name>`` (e.g. ``tfds:svhn_cropped``).

Nothing is downloaded unless the caller asks (``download=True``, the ``--download``
flag). Without it the dataset must already be prepared in ``data_dir`` (TFDS's default
``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR`` when empty); if it is not, loading
fails at once with a message that says how to prepare it offline. (Left to itself,
``tfds.load`` on a machine without network retries for minutes before failing.)

Only the requested classes are read (``select``), so a 100-class subset of
``imagenet_resized/32x32`` does not hold all 1000 classes in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from dgm_tf.data.sources import DataError, RawDataset

__all__ = ["KNOWN_BUILDERS", "load_tfds", "test_split_name"]

KNOWN_BUILDERS: tuple[str, ...] = (
    "mnist",
    "fashion_mnist",
    "svhn_cropped",
    "cifar10",
    "imagenet_resized/32x32",
)
"""Builders the configs use and the tests check under ``tfds.testing.mock_data``. Any
other builder with an ``image`` and a ``label`` feature and train/test splits works too."""

# Builders without a "test" split: their held-out split serves as the test set (the
# reference evaluates ImageNet on its validation folder, run_DGMw_imagenet.py).
_TEST_SPLIT_FALLBACK = "validation"
_READ_BATCH = 2048


def test_split_name(name: str, available: Sequence[str]) -> str:
    """The split used as test data: ``test``, else ``validation``."""
    if available:
        for split in ("test", _TEST_SPLIT_FALLBACK):
            if split in available:
                return split
        raise DataError(f"tfds:{name}: no 'test' or 'validation' split (splits: {sorted(available)})")
    # Not prepared yet (e.g. under mock_data): split names are not known from metadata.
    return _TEST_SPLIT_FALLBACK if name.split("/")[0].split(":")[0] == "imagenet_resized" else "test"


def _offline_message(name: str, data_dir: str) -> str:
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return (
        f"tfds:{name}: not prepared in {where}, and downloading is off. Either pass --download "
        f"(needs network), or prepare it offline: on a machine with network run "
        f"`tfds build {name} --data_dir=DIR` (or tfds.builder('{name}', data_dir='DIR')"
        f".download_and_prepare()), copy DIR here and pass --data_dir=DIR"
    )


def load_tfds(
    name: str,
    *,
    data_dir: str = "",
    download: bool = False,
    select: Callable[[Sequence[int]], Sequence[int]] | None = None,
) -> RawDataset:
    """Loads a TFDS image-classification dataset into memory.

    Args:
        name: Builder name, optionally with config and version
            (``imagenet_resized/32x32``, ``mnist:3.0.1``).
        data_dir: Where prepared datasets live ("" for TFDS's default).
        download: Allow TFDS to download and prepare the data.
        select: Given all class ids of the dataset, returns the ones to read (None:
            all). Images of other classes are skipped while reading.

    Returns:
        uint8 images ``[N, H, W, C]``, int64 labels (the dataset's class ids) and the
        dataset's class names; the test split is ``test`` (``validation`` for datasets
        without one).

    Raises:
        DataError: unknown builder, missing data_dir, data not prepared (with the
            offline instructions), a download that fails, or a dataset without image
            and label features.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    spec = f"tfds:{name}"
    if not name:
        raise DataError("dataset spec 'tfds:' must be followed by a builder name, e.g. tfds:mnist")
    if data_dir and not download and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir}: does not exist (it must hold prepared TFDS data). "
                        + _offline_message(name, data_dir))
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"{spec}: no such TFDS builder; known to work: {', '.join(KNOWN_BUILDERS)}"
        ) from None
    except (ValueError, AssertionError) as e:  # unknown config or version
        raise DataError(f"{spec}: {str(e).splitlines()[0]}") from None

    features = builder.info.features
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2 or not isinstance(keys[0], str) or not isinstance(keys[1], str):
        raise DataError(f"{spec}: not an image-classification dataset (no (image, label) supervised keys)")
    image_key, label_key = keys
    label_feature = features[label_key]
    if not hasattr(label_feature, "names"):
        raise DataError(f"{spec}: the label feature {label_key!r} is not a class label")
    class_names = tuple(label_feature.names)
    all_ids = list(range(len(class_names)))
    keep = sorted(int(c) for c in (select(all_ids) if select else all_ids))

    if download:
        try:
            builder.download_and_prepare()
        except Exception as e:  # network, checksum, disk: the user asked, report it plainly
            raise DataError(f"{spec}: download_and_prepare failed: {type(e).__name__}: {e}") from None

    splits = list(builder.info.splits.keys())
    arrays = {}
    for part, split in (("train", "train"), ("test", test_split_name(name, splits))):
        filtering = len(keep) < len(all_ids)
        # When only some classes are used, images are decoded after the label filter, so
        # the classes skipped cost no image decoding (10 of 1000 ImageNet classes: 1 %).
        decoders = {image_key: tfds.decode.SkipDecoding()} if filtering else None
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False, decoders=decoders)
        except AssertionError:  # tfds: "could not find data in <data_dir> ..."
            raise DataError(_offline_message(name, data_dir)) from None
        except ValueError as e:  # unknown split
            raise DataError(f"{spec}: split {split!r}: {e}") from None
        if filtering:
            wanted = tf.constant(keep, dtype=label_feature.tf_dtype)
            image_feature = features[image_key]

            def is_wanted(encoded, label):
                return tf.reduce_any(tf.equal(label, wanted))

            def decode(encoded, label):
                return image_feature.decode_example(encoded), label

            ds = ds.filter(is_wanted).map(decode)
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(_READ_BATCH)):
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
        shape = tuple(features[image_key].shape)
        x = np.concatenate(xs) if xs else np.zeros((0,) + shape, np.uint8)
        y = np.concatenate(ys) if ys else np.zeros((0,), np.int64)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{spec}: expected uint8 images [N, H, W, C], got dtype {x.dtype} shape {x.shape}")
        arrays[part] = (x, y)
    return RawDataset(
        name=spec,
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        class_names=class_names,
    )
