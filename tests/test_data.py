"""Tests of dgm_tf.data: sources (embedded sample, IDX reader) and the class-incremental split."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pathlib
import re

import numpy as np
import pytest

from dgm_tf.data import (
    FASHION_MNIST_CLASS_NAMES,
    DataError,
    RawDataset,
    Scenario,
    load_dataset,
    make_scenario,
    to_model_images,
)
from dgm_tf.data import sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDED_DIR = REPO_ROOT / "dgm_tf" / "data" / "embedded"
DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_debian_data = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist is not installed"
)


# ------------------------------------------------------------------ helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encodes an array as an IDX file, written by hand (independent of the reader)."""
    big_endian = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=big_endian).tobytes()


def write_idx(path: pathlib.Path, array: np.ndarray, *, gz: bool = False,
              type_code: int = 0x08) -> pathlib.Path:
    """Writes ``array`` as IDX to ``path`` (plus ``.gz`` and gzip compression if ``gz``)."""
    data = idx_bytes(array, type_code)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def make_idx_dir(directory: pathlib.Path, *, gz_train: bool = False, gz_test: bool = True,
                 n_train: int = 30, n_test: int = 10, num_classes: int = 3) -> dict:
    """Writes a small random MNIST-format dataset and returns its arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % num_classes).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % num_classes).astype(np.uint8),
    }
    write_idx(directory / "train-images-idx3-ubyte", arrays["x_train"], gz=gz_train)
    write_idx(directory / "train-labels-idx1-ubyte", arrays["y_train"], gz=gz_train)
    write_idx(directory / "t10k-images-idx3-ubyte", arrays["x_test"], gz=gz_test)
    write_idx(directory / "t10k-labels-idx1-ubyte", arrays["y_test"], gz=gz_test)
    return arrays


def decode_constant(x: np.ndarray) -> np.ndarray:
    """Grey level of constant model images (inverse of to_model_images on constant input)."""
    return np.rint((x[:, 0, 0, 0] + 1.0) / 2.0 * 255.0).astype(np.int64)


# Synthetic dataset: every image is constant, its grey level = its index in its split.
NUM_SYN_CLASSES = 5
SYN_TRAIN_PER_CLASS = 40
SYN_TEST_PER_CLASS = 8


@pytest.fixture(scope="module")
def synthetic() -> RawDataset:
    """5 classes, 40 train and 8 test images each, interleaved; pixel value = index."""
    n_train = NUM_SYN_CLASSES * SYN_TRAIN_PER_CLASS
    n_test = NUM_SYN_CLASSES * SYN_TEST_PER_CLASS
    x_train = np.broadcast_to(
        np.arange(n_train, dtype=np.uint8)[:, None, None, None], (n_train, 28, 28, 1)
    ).copy()
    x_test = np.broadcast_to(
        np.arange(n_test, dtype=np.uint8)[:, None, None, None], (n_test, 28, 28, 1)
    ).copy()
    return RawDataset(
        name="synthetic",
        x_train=x_train,
        y_train=np.arange(n_train) % NUM_SYN_CLASSES,
        x_test=x_test,
        y_test=np.arange(n_test) % NUM_SYN_CLASSES,
        class_names=tuple(f"class{c}" for c in range(NUM_SYN_CLASSES)),
    )


# ------------------------------------------------------------ embedded data


def test_embedded_sample_shapes_counts_and_names():
    raw = load_dataset("embedded")
    assert raw.name == "embedded:fashion_mnist"
    assert raw.x_train.shape == (6000, 28, 28, 1) and raw.x_train.dtype == np.uint8
    assert raw.x_test.shape == (2000, 28, 28, 1) and raw.x_test.dtype == np.uint8
    assert raw.y_train.dtype == np.int64 and raw.y_test.dtype == np.int64
    assert raw.class_names == FASHION_MNIST_CLASS_NAMES
    assert len(raw.class_names) == 10 and raw.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.bincount(raw.y_train), [600] * 10)
    np.testing.assert_array_equal(np.bincount(raw.y_test), [200] * 10)
    # Real pictures: full dynamic range, varied pixels, no two classes with the same mean image.
    assert raw.x_train.min() == 0 and raw.x_train.max() == 255
    assert raw.x_train.std() > 50
    assert len(np.unique(raw.x_train.reshape(6000, -1)[:100], axis=0)) == 100
    means = np.stack([raw.x_train[raw.y_train == c].mean(axis=0) for c in range(10)])
    for a in range(10):
        for b in range(a + 1, 10):
            assert np.abs(means[a] - means[b]).mean() > 5, (a, b)


def test_embedded_spec_aliases_and_unknown_spec():
    assert load_dataset("embedded:fashion_mnist").x_train.shape[0] == 6000
    with pytest.raises(DataError) as err:
        load_dataset("mnist_from_the_moon")
    message = str(err.value)
    assert "mnist_from_the_moon" in message and "embedded" in message and "idx:<dir>" in message
    with pytest.raises(DataError, match="directory"):
        load_dataset("idx:")


def test_provenance_records_the_npz_sha256_and_licence():
    npz = EMBEDDED_DIR / "fashion_mnist_sample.npz"
    text = (EMBEDDED_DIR / "PROVENANCE.md").read_text()
    assert npz.stat().st_size < 6 * 1024 * 1024
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    assert re.search(r"sha256: `([0-9a-f]{64})`", text).group(1) == digest
    assert "zalandoresearch/fashion-mnist" in text
    assert "Copyright (c) 2017 Zalando SE" in text and "MIT" in text
    assert "tools/make_embedded_data.py" in text


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "make_embedded_data", REPO_ROOT / "tools" / "make_embedded_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_npz_writer_is_byte_reproducible_and_loadable(tmp_path):
    tool = _load_tool()
    arrays = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": np.array(["x", "yz"])}
    first, second = tool.npz_bytes(arrays), tool.npz_bytes(arrays)
    assert first == second
    (tmp_path / "t.npz").write_bytes(first)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["a"], arrays["a"])
        assert npz["names"].tolist() == ["x", "yz"]


@needs_debian_data
def test_embedded_sample_regenerates_identically(tmp_path):
    tool = _load_tool()
    out = tmp_path / "sample.npz"
    assert tool.main(["--source_dir", str(DEBIAN_FASHION_MNIST), "--output", str(out)]) == 0
    with np.load(out) as new, np.load(EMBEDDED_DIR / "fashion_mnist_sample.npz") as packaged:
        assert sorted(new.files) == sorted(packaged.files)
        for key in packaged.files:
            np.testing.assert_array_equal(new[key], packaged[key], err_msg=key)


# --------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz_train,gz_test", [(False, False), (True, True), (False, True)])
def test_idx_dir_roundtrip_plain_and_gzipped(tmp_path, gz_train, gz_test):
    arrays = make_idx_dir(tmp_path / "digits", gz_train=gz_train, gz_test=gz_test)
    raw = load_dataset(f"idx:{tmp_path / 'digits'}")
    assert raw.name == f"idx:{tmp_path / 'digits'}"
    assert raw.x_train.shape == (30, 28, 28, 1) and raw.x_train.dtype == np.uint8
    assert raw.y_train.dtype == np.int64
    np.testing.assert_array_equal(raw.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(raw.y_train, arrays["y_train"])
    np.testing.assert_array_equal(raw.x_test[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(raw.y_test, arrays["y_test"])
    assert raw.class_names == tuple(str(i) for i in range(10))


def test_idx_class_names_file_and_fashion_default(tmp_path):
    make_idx_dir(tmp_path / "custom")
    (tmp_path / "custom" / "class_names.txt").write_text("cat\ndog\nbird\n\n")
    assert load_dataset(f"idx:{tmp_path / 'custom'}").class_names == ("cat", "dog", "bird")

    make_idx_dir(tmp_path / "My-Fashion-MNIST")
    raw = load_dataset(f"idx:{tmp_path / 'My-Fashion-MNIST'}")
    assert raw.class_names == FASHION_MNIST_CLASS_NAMES


def test_idx_reads_other_types_in_native_byte_order(tmp_path):
    path = write_idx(tmp_path / "ints", np.array([1, 70000, -5], dtype=np.int32), type_code=0x0C)
    values = sources.read_idx(path)
    np.testing.assert_array_equal(values, [1, 70000, -5])
    assert values.dtype.isnative and values.flags.writeable


def test_idx_wrong_magic(tmp_path):
    make_idx_dir(tmp_path / "d")
    bad = tmp_path / "d" / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match="magic") as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    assert "train-images-idx3-ubyte" in str(err.value)
    assert "0x12345678" in str(err.value)


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_idx_truncated(tmp_path, cut):
    make_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    assert "train-images-idx3-ubyte" in str(err.value)


def test_idx_truncated_gzip(tmp_path):
    make_idx_dir(tmp_path / "d", gz_test=True)
    path = tmp_path / "d" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match="gzip") as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"junk")
    with pytest.raises(DataError, match="4 bytes after") as err:
        sources.read_idx(path)
    assert str(path) in str(err.value)


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path / "d", gz_test=False)
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "10 images" in message and "7 labels" in message


def test_idx_missing_dir_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset(f"idx:{tmp_path / 'nowhere'}")
    assert "nowhere" in str(err.value)
    make_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX file train-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path / 'd'}")


def test_idx_labels_out_of_range_of_class_names(tmp_path):
    make_idx_dir(tmp_path / "d", num_classes=3)
    (tmp_path / "d" / "class_names.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="label 2 is out of range") as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_idx_labels_file_with_image_shape_is_rejected(tmp_path):
    make_idx_dir(tmp_path / "d", gz_train=False)
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros((30, 2), np.uint8))
    with pytest.raises(DataError, match="1-D integer labels") as err:
        load_dataset(f"idx:{tmp_path / 'd'}")
    assert "train-labels-idx1-ubyte" in str(err.value)


@needs_debian_data
def test_idx_reads_debian_fashion_mnist():
    raw = load_dataset(f"idx:{DEBIAN_FASHION_MNIST}")
    assert raw.x_train.shape == (60000, 28, 28, 1)
    assert raw.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(raw.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(raw.y_test), [1000] * 10)
    assert raw.class_names == FASHION_MNIST_CLASS_NAMES


# --------------------------------------------------------- to_model_images


def test_to_model_images_range_shape_and_extremes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    y = to_model_images(x)
    assert y.shape == (7, 32, 32, 1) and y.dtype == np.float32
    assert y.min() >= -1.0 and y.max() <= 1.0
    np.testing.assert_allclose(y[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(y[1], 1.0, atol=1e-6)
    assert y[2:].std() > 0.3  # random pixels stay varied
    # Means are preserved approximately by bilinear resizing.
    np.testing.assert_allclose(y[2:].mean(), (x[2:] / 255.0 * 2 - 1).mean(), atol=0.02)


def test_to_model_images_is_deterministic_and_batch_independent():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (10, 28, 28, 3), dtype=np.uint8)
    a = to_model_images(x)
    np.testing.assert_array_equal(a, to_model_images(x))
    np.testing.assert_array_equal(a, to_model_images(x, batch_size=3))
    assert a.shape == (10, 32, 32, 3)
    same_size = to_model_images(x, size=28)
    np.testing.assert_allclose(same_size, x / 255.0 * 2 - 1, atol=1e-6)
    assert to_model_images(x[:0]).shape == (0, 32, 32, 3)


def test_to_model_images_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        to_model_images(np.zeros((1, 28, 28, 1), np.float32))


# ------------------------------------------------------------ make_scenario


def _split_indices(task):
    """Source indices of a task's train, val and test images (decoded from pixel values)."""
    return decode_constant(task.x_train), decode_constant(task.x_val), decode_constant(task.x_test)


def test_scenario_partition_order_and_labels(synthetic):
    order = [3, 0, 4, 1, 2]
    sc = make_scenario(synthetic, class_order=order, classes_per_task=1, num_tasks=None)
    assert isinstance(sc, Scenario)
    assert sc.class_order == tuple(order) and sc.num_classes == 5 and sc.num_tasks == 5
    assert sc.class_names == tuple(f"class{c}" for c in order)
    assert sc.image_shape == (32, 32, 1) and sc.classes_per_task == 1
    assert sc.dataset == "synthetic"
    for t, task in enumerate(sc.tasks):
        assert task.index == t
        assert task.classes == (order[t],) and task.labels == (t,)
        for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val),
                     (task.x_test, task.y_test)):
            assert x.dtype == np.float32 and x.shape[1:] == (32, 32, 1)
            assert x.min() >= -1 and x.max() <= 1
            assert y.dtype == np.int32 and np.all(y == t) and len(y) == len(x)

    assert "array" not in repr(sc.tasks[0]) and "array" not in repr(synthetic)
    # A flagfile-style string order is accepted too.
    assert make_scenario(synthetic, class_order="3, 0 4,1,2", classes_per_task=5,
                         num_tasks=None).class_order == tuple(order)

    sc2 = make_scenario(synthetic, class_order=None, classes_per_task=2, num_tasks=2)
    assert sc2.class_order == (0, 1, 2, 3) and sc2.num_classes == 4 and sc2.num_tasks == 2
    seen = [c for task in sc2.tasks for c in task.classes]
    assert seen == [0, 1, 2, 3]  # every used class in exactly one task, in order
    assert sc2.tasks[1].labels == (2, 3)
    assert set(np.unique(sc2.tasks[1].y_train)) == {2, 3}


def test_scenario_splits_are_disjoint_complete_and_sized(synthetic):
    order = [4, 2, 0, 1, 3]
    sc = make_scenario(synthetic, class_order=order, classes_per_task=1, num_tasks=None,
                       validation_fraction=0.25)
    for task in sc.tasks:
        (c,) = task.classes
        train, val, test = _split_indices(task)
        # Images come from the right class, and the label matches the class order.
        assert np.all(synthetic.y_train[train] == c) and np.all(synthetic.y_train[val] == c)
        assert np.all(synthetic.y_test[test] == c)
        assert np.all(np.asarray(order)[task.y_train] == c)
        # Train and val are disjoint and together cover the class; test is the whole class.
        assert not set(train) & set(val)
        assert len(set(train)) == len(train)
        assert sorted(np.concatenate([train, val])) == list(np.flatnonzero(synthetic.y_train == c))
        assert sorted(test) == list(np.flatnonzero(synthetic.y_test == c))
        assert abs(len(val) - 0.25 * SYN_TRAIN_PER_CLASS) <= 1


def test_scenario_caps_train_and_mixes_classes(synthetic):
    sc = make_scenario(synthetic, class_order=None, classes_per_task=5, num_tasks=None,
                       train_examples_per_class=7, validation_fraction=0.15)
    (task,) = sc.tasks
    np.testing.assert_array_equal(np.bincount(task.y_train), [7] * 5)
    np.testing.assert_array_equal(np.bincount(task.y_val), [6] * 5)  # round(0.15 * 40)
    np.testing.assert_array_equal(np.bincount(task.y_test), [SYN_TEST_PER_CLASS] * 5)
    train, val, _ = _split_indices(task)
    assert not set(train) & set(val)
    # Shuffled: the classes are interleaved, not in blocks.
    assert np.count_nonzero(np.diff(task.y_train)) > 10


def test_scenario_is_deterministic_from_seed(synthetic):
    kwargs = dict(class_order=[1, 0, 2, 3], classes_per_task=2, num_tasks=None)
    a = make_scenario(synthetic, seed=5, **kwargs)
    b = make_scenario(synthetic, seed=5, **kwargs)
    c = make_scenario(synthetic, seed=6, **kwargs)
    for ta, tb in zip(a.tasks, b.tasks):
        for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(ta, key), getattr(tb, key))
    assert any(
        not np.array_equal(ta.x_val, tc.x_val) for ta, tc in zip(a.tasks, c.tasks)
    )
    # A class's hold-out does not depend on where the class sits in the order.
    d = make_scenario(synthetic, seed=5, class_order=[2, 3, 1, 0], classes_per_task=1,
                      num_tasks=None)
    val_a = set(decode_constant(a.tasks[0].x_val)[a.tasks[0].y_val == 0])  # class 1
    val_d = set(decode_constant(d.tasks[2].x_val))  # class 1
    assert val_a == val_d


def test_scenario_on_embedded_sample():
    sc = make_scenario(load_dataset("embedded"), class_order=None, classes_per_task=2,
                       num_tasks=None)
    assert sc.num_tasks == 5 and sc.image_shape == (32, 32, 1)
    assert sc.class_names == FASHION_MNIST_CLASS_NAMES
    for task in sc.tasks:
        assert task.x_train.shape == (2 * 510, 32, 32, 1)
        assert task.x_val.shape == (2 * 90, 32, 32, 1)
        assert task.x_test.shape == (2 * 200, 32, 32, 1)
        assert task.x_train.min() == -1.0 and task.x_train.max() > 0.99


@pytest.mark.parametrize(
    "kwargs,flag,value",
    [
        (dict(class_order=[0, 1, 1, 2]), "--class_order", "[1]"),
        (dict(class_order=[0, 9]), "--class_order", "[9]"),
        (dict(class_order=[0, -1]), "--class_order", "[-1]"),
        (dict(class_order=[0, 5]), "--class_order", "[5]"),  # named but absent from the data
        (dict(class_order=[]), "--class_order", "empty"),
        (dict(class_order=[0, "x"]), "--class_order", "'x'"),
        (dict(classes_per_task=0), "--classes_per_task", "0"),
        (dict(classes_per_task=2), "--classes_per_task", "2"),  # 2 does not divide 5
        (dict(classes_per_task=2, num_tasks=3), "--num_tasks", "3"),
        (dict(num_tasks=0), "--num_tasks", "0"),
        (dict(validation_fraction=0.0), "--validation_fraction", "0.0"),
        (dict(validation_fraction=1.0), "--validation_fraction", "1.0"),
        (dict(train_examples_per_class=-1), "--train_examples_per_class", "-1"),
        (dict(seed=-3), "--seed", "-3"),
    ],
)
def test_scenario_bad_flags_raise_data_error_naming_the_flag(synthetic, kwargs, flag, value):
    raw = synthetic
    if kwargs.get("class_order") == [0, 5]:
        raw = RawDataset(name="six_names", x_train=synthetic.x_train, y_train=synthetic.y_train,
                         x_test=synthetic.x_test, y_test=synthetic.y_test,
                         class_names=synthetic.class_names + ("unused",))
    args = dict(class_order=None, classes_per_task=1, num_tasks=None)
    args.update(kwargs)
    with pytest.raises(DataError) as err:
        make_scenario(raw, **args)
    assert flag in str(err.value) and value in str(err.value)


def test_raw_dataset_validates_its_arrays(synthetic):
    with pytest.raises(DataError, match="uint8"):
        RawDataset(name="bad", x_train=synthetic.x_train.astype(np.float32),
                   y_train=synthetic.y_train, x_test=synthetic.x_test,
                   y_test=synthetic.y_test, class_names=synthetic.class_names)
    with pytest.raises(DataError, match="out of range"):
        RawDataset(name="bad", x_train=synthetic.x_train, y_train=synthetic.y_train,
                   x_test=synthetic.x_test, y_test=synthetic.y_test, class_names=("a", "b"))
