"""Tests of dgm_tf.data.files: the npz and image-folder sources and the held-out test split."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.data.files import convert_channels, load_folder, load_npz, split_test
from dgm_tf.data.sources import DataError, RawDataset

SPLIT = dict(test_fraction=0.25, seed=0)


# ------------------------------------------------------------------ helpers


def write_png(path: pathlib.Path, image: np.ndarray) -> pathlib.Path:
    """Writes uint8 [H, W, C] as PNG (lossless), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(image).numpy())
    return path


def write_jpeg(path: pathlib.Path, image: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_jpeg(image, quality=100).numpy())
    return path


def const_image(value: int, channels: int = 1, size: tuple[int, int] = (4, 5)) -> np.ndarray:
    return np.full(size + (channels,), value, dtype=np.uint8)


def make_pool_folder(root: pathlib.Path, counts: dict[str, int], channels: int = 1) -> dict:
    """Layout A: class folders of constant PNGs whose grey level encodes (class, index)."""
    expected = {}
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            value = 40 * c + i
            write_png(root / name / f"img{i:03d}.png", const_image(value, channels))
            expected[value] = c
    return expected


def raises_data_error(fn, *phrases: str) -> str:
    """Calls fn, asserts DataError whose message contains every phrase; returns the message."""
    with pytest.raises(DataError) as err:
        fn()
    message = str(err.value)
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    return message


def save_npz(path: pathlib.Path, **arrays) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def split_arrays(rng: np.random.Generator, channels_axis: bool = False) -> dict:
    shape = (6, 3, 4, 3) if channels_axis else (6, 3, 4)
    return {
        "x_train": rng.integers(0, 256, shape, dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
        "x_test": rng.integers(0, 256, (2,) + shape[1:], dtype=np.uint8),
        "y_test": np.array([2, 0], dtype=np.uint8),
    }


# --------------------------------------------------------------------- npz


def test_npz_split_layout_roundtrip(tmp_path):
    arrays = split_arrays(np.random.default_rng(0), channels_axis=True)
    path = save_npz(tmp_path / "d.npz", class_names=np.array(["cat", "dog", "eel"]), **arrays)
    raw = load_npz(path, **SPLIT)
    assert isinstance(raw, RawDataset) and raw.name == f"npz:{path}"
    for key in ("x_train", "x_test"):
        got = getattr(raw, key)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])
    for key in ("y_train", "y_test"):
        assert getattr(raw, key).dtype == np.int64
        np.testing.assert_array_equal(getattr(raw, key), arrays[key])
    assert raw.class_names == ("cat", "dog", "eel")


def test_npz_grayscale_gets_channel_axis_and_numeric_names(tmp_path):
    arrays = split_arrays(np.random.default_rng(1))
    raw = load_npz(save_npz(tmp_path / "g.npz", **arrays), **SPLIT)
    assert raw.x_train.shape == (6, 3, 4, 1)
    np.testing.assert_array_equal(raw.x_train[..., 0], arrays["x_train"])
    assert raw.class_names == ("0", "1", "2")


def test_npz_pool_layout_holds_out_test_split(tmp_path):
    n_per_class, num_classes = 8, 3
    y = np.tile(np.arange(num_classes), n_per_class)
    x = np.broadcast_to(np.arange(len(y), dtype=np.uint8)[:, None, None], (len(y), 2, 2)).copy()
    path = save_npz(tmp_path / "p.npz", x=x, y=y, class_names=np.array(["a", "b", "c"]))
    raw = load_npz(path, test_fraction=0.25, seed=3)
    assert raw.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(np.bincount(raw.y_test), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(raw.y_train), [6, 6, 6])
    # Every image appears once, with its own label (pixel value = pool index).
    ids = np.concatenate([raw.x_train[:, 0, 0, 0], raw.x_test[:, 0, 0, 0]]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(len(y)))
    labels = np.concatenate([raw.y_train, raw.y_test])
    np.testing.assert_array_equal(labels, y[ids])
    # Same as split_test on the pool.
    x_tr, _, x_te, _ = split_test(x[..., None], y, 0.25, 3)
    np.testing.assert_array_equal(raw.x_train, x_tr)
    np.testing.assert_array_equal(raw.x_test, x_te)


def test_npz_other_integer_dtype_in_range_is_accepted(tmp_path):
    arrays = split_arrays(np.random.default_rng(2))
    wide = {**arrays, "x_train": arrays["x_train"].astype(np.int64)}
    raw = load_npz(save_npz(tmp_path / "i.npz", **wide), **SPLIT)
    assert raw.x_train.dtype == np.uint8
    np.testing.assert_array_equal(raw.x_train[..., 0], arrays["x_train"])


def test_npz_float_images_rejected(tmp_path):
    arrays = split_arrays(np.random.default_rng(3))
    arrays["x_train"] = arrays["x_train"] / 255.0
    path = save_npz(tmp_path / "f.npz", **arrays)
    message = raises_data_error(lambda: load_npz(path, **SPLIT), str(path), "float64", "uint8")
    assert "0..255" in message and "[0, 1]" in message


def test_npz_integer_out_of_range_rejected(tmp_path):
    arrays = split_arrays(np.random.default_rng(4))
    arrays["x_test"] = arrays["x_test"].astype(np.int16) + 300
    path = save_npz(tmp_path / "o.npz", **arrays)
    raises_data_error(lambda: load_npz(path, **SPLIT), str(path), "'x_test'", "int16", "0..255")


def test_npz_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.npz"
    raises_data_error(lambda: load_npz(missing, **SPLIT), str(missing), "not found")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    raises_data_error(lambda: load_npz(garbage, **SPLIT), str(garbage), "not a valid .npz")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    raises_data_error(lambda: load_npz(npy, **SPLIT), str(npy), ".npy")
    good = save_npz(tmp_path / "good.npz", **split_arrays(np.random.default_rng(5)))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    raises_data_error(lambda: load_npz(truncated, **SPLIT), str(truncated), "corrupt")
    raises_data_error(lambda: load_npz(tmp_path, **SPLIT), str(tmp_path), "directory")


def test_npz_pickled_object_array_rejected(tmp_path):
    path = save_npz(
        tmp_path / "obj.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.array([0, 0, 1, 1]),
        class_names=np.array(["a", None], dtype=object),
    )
    raises_data_error(lambda: load_npz(path, **SPLIT), str(path), "'class_names'", "pickled")


def test_npz_missing_keys_lists_found_keys_and_layouts(tmp_path):
    path = save_npz(tmp_path / "k.npz", images=np.zeros((2, 2, 2), np.uint8), y=np.zeros(2, int))
    message = raises_data_error(
        lambda: load_npz(path, **SPLIT), str(path), "'x'", "['images', 'y']", "x_train"
    )
    assert "accepted layouts" in message
    partial = save_npz(tmp_path / "part.npz", x_train=np.zeros((2, 2, 2), np.uint8),
                       y_train=np.zeros(2, int))
    raises_data_error(lambda: load_npz(partial, **SPLIT), str(partial), "'x_test'", "'y_test'")


@pytest.mark.parametrize(
    "change,phrases",
    [
        (dict(y_train=np.array([0, 1, 2, 0, 1])), ["'x_train' holds 6 images", "5 labels"]),
        (dict(y_train=np.array([0, 1, 2, 0, 1, 2.0])), ["'y_train'", "1-D integer"]),
        (dict(y_test=np.array([[2], [0]])), ["'y_test'", "1-D integer"]),
        (dict(y_test=np.array([2, -1])), ["'y_test'", "negative label -1"]),
        (dict(x_train=np.zeros((0, 3, 4), np.uint8), y_train=np.zeros(0, int)), ["empty"]),
        (dict(x_train=np.zeros((6, 3, 4, 4), np.uint8)), ["4 channels", "1 (grayscale) or 3"]),
        (dict(x_test=np.zeros((2, 3, 5), np.uint8)), ["(3, 4, 1)", "(3, 5, 1)", "same size"]),
        (dict(x_test=np.zeros((2, 12), np.uint8)), ["'x_test'", "[N, H, W]"]),
    ],
    ids=["length", "float-labels", "2d-labels", "negative", "empty", "channels", "sizes", "ndim"],
)
def test_npz_bad_arrays(tmp_path, change, phrases):
    arrays = {**split_arrays(np.random.default_rng(6)), **change}
    path = save_npz(tmp_path / "bad.npz", **arrays)
    raises_data_error(lambda: load_npz(path, **SPLIT), str(path), *phrases)


def test_npz_labels_beyond_class_names(tmp_path):
    arrays = split_arrays(np.random.default_rng(7))
    path = save_npz(tmp_path / "n.npz", class_names=np.array(["a", "b"]), **arrays)
    raises_data_error(lambda: load_npz(path, **SPLIT), str(path), "label 2", "2 classes")


def test_npz_bad_arguments_raise_value_error(tmp_path):
    path = save_npz(tmp_path / "a.npz", **split_arrays(np.random.default_rng(8)))
    for fraction in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="test_fraction"):
            load_npz(path, test_fraction=fraction, seed=0)
    with pytest.raises(ValueError, match="seed"):
        load_npz(path, test_fraction=0.2, seed=-1)


# ------------------------------------------------------------------ folder


def test_folder_pool_layout_roundtrip_sorted_classes(tmp_path):
    root = tmp_path / "pool"
    expected = make_pool_folder(root, {"zebra": 5, "ant": 4, "Moose": 3})
    (root / "README.txt").write_text("not an image")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / ".DS_Store").write_bytes(b"\0\1")
    (root / "ant" / ".hidden.png").write_bytes(b"not even a png")
    (root / ".cache").mkdir()
    raw = load_folder(root, channels=0, test_fraction=0.25, seed=1)
    assert raw.name == f"folder:{root}"
    assert raw.class_names == ("Moose", "ant", "zebra")  # sorted: uppercase first
    assert raw.x_train.shape[1:] == (4, 5, 1) and raw.x_train.dtype == np.uint8
    x = np.concatenate([raw.x_train, raw.x_test])
    y = np.concatenate([raw.y_train, raw.y_test])
    assert len(x) == 12 and (x == x[:, :1, :1, :]).all()  # lossless PNG: constant images
    assert {int(v): int(c) for v, c in zip(x[:, 0, 0, 0], y)} == expected
    np.testing.assert_array_equal(np.bincount(raw.y_test), [1, 1, 1])  # 0.75, 1, 1.25 -> 1


def test_folder_train_test_layout(tmp_path):
    root = tmp_path / "tt"
    write_png(root / "train" / "b" / "1.png", const_image(11))
    write_png(root / "train" / "b" / "0.PNG", const_image(10))
    write_png(root / "train" / "a" / "x.png", const_image(20))
    write_png(root / "train" / "c" / "x.png", const_image(30))
    write_png(root / "test" / "b" / "t.png", const_image(12))
    write_png(root / "test" / "a" / "t.png", const_image(21))
    raw = load_folder(root, channels=0, **SPLIT)
    assert raw.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(raw.x_train[:, 0, 0, 0], [20, 10, 11, 30])  # sorted files
    np.testing.assert_array_equal(raw.y_train, [0, 1, 1, 2])
    np.testing.assert_array_equal(raw.x_test[:, 0, 0, 0], [21, 12])
    np.testing.assert_array_equal(raw.y_test, [0, 1])


def test_folder_test_class_unknown_to_train(tmp_path):
    root = tmp_path / "tt"
    write_png(root / "train" / "a" / "x.png", const_image(1))
    write_png(root / "test" / "a" / "x.png", const_image(1))
    write_png(root / "test" / "zz" / "x.png", const_image(1))
    raises_data_error(lambda: load_folder(root, channels=0, **SPLIT), str(root / "test"), "'zz'")


def test_folder_rgb_and_jpeg_and_rgba(tmp_path):
    rng = np.random.default_rng(9)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "d" / "a" / "0.png", rgba)
    write_png(tmp_path / "d" / "a" / "1.png", rgb)
    write_jpeg(tmp_path / "d" / "b" / "0.jpg", np.full((4, 5, 3), 200, np.uint8))
    write_jpeg(tmp_path / "d" / "b" / "1.JPEG", np.full((4, 5, 3), 100, np.uint8))
    raw = load_folder(tmp_path / "d", channels=0, test_fraction=0.5, seed=0)
    assert raw.image_shape == (4, 5, 3)
    x = np.concatenate([raw.x_train, raw.x_test])
    y = np.concatenate([raw.y_train, raw.y_test])
    class_a = x[y == 0]
    assert any(np.array_equal(img, rgba[..., :3]) for img in class_a)  # alpha dropped
    assert any(np.array_equal(img, rgb) for img in class_a)
    assert sorted(int(np.rint(img.mean())) for img in x[y == 1]) == [100, 200]


def test_folder_mixed_gray_and_rgb(tmp_path):
    root = tmp_path / "mix"
    pixel = np.array([10, 200, 50], dtype=np.uint8)
    gray_file = write_png(root / "a" / "g.png", const_image(77))
    write_png(root / "a" / "h.png", const_image(78))
    rgb_file = write_png(root / "b" / "c.png", np.broadcast_to(pixel, (4, 5, 3)).copy())
    write_png(root / "b" / "d.png", np.broadcast_to(pixel, (4, 5, 3)).copy())
    message = raises_data_error(
        lambda: load_folder(root, channels=0, **SPLIT), str(gray_file), str(rgb_file)
    )
    assert "--channels=1" in message and "--channels=3" in message

    luma = 126  # 0.2989 * 10 + 0.5870 * 200 + 0.1140 * 50 = 126.089
    gray = load_folder(root, channels=1, **SPLIT)
    assert gray.image_shape == (4, 5, 1)
    x, y = np.concatenate([gray.x_train, gray.x_test]), np.concatenate([gray.y_train, gray.y_test])
    assert set(x[y == 1].ravel().tolist()) == {luma}
    assert set(x[y == 0].ravel().tolist()) == {77, 78}

    rgb = load_folder(root, channels=3, **SPLIT)
    assert rgb.image_shape == (4, 5, 3)
    x, y = np.concatenate([rgb.x_train, rgb.x_test]), np.concatenate([rgb.y_train, rgb.y_test])
    assert (x[y == 1] == pixel).all()
    assert sorted(np.unique(x[y == 0].reshape(-1, 3), axis=0).tolist()) == [[77] * 3, [78] * 3]


def test_folder_mixed_sizes_names_odd_file(tmp_path):
    root = tmp_path / "sizes"
    write_png(root / "a" / "0.png", const_image(1, size=(4, 5)))
    write_png(root / "a" / "1.png", const_image(1, size=(4, 5)))
    odd = write_png(root / "b" / "0.png", const_image(1, size=(6, 5)))
    write_png(root / "b" / "1.png", const_image(1, size=(4, 5)))
    raises_data_error(
        lambda: load_folder(root, channels=0, **SPLIT), str(odd), "6x5", "4x5", "resize"
    )


def test_folder_empty_class_and_corrupt_image(tmp_path):
    root = tmp_path / "d"
    make_pool_folder(root, {"a": 2})
    (root / "empty").mkdir()
    (root / "empty" / "readme.md").write_text("no images here")
    raises_data_error(
        lambda: load_folder(root, channels=0, **SPLIT), str(root / "empty"), "no image files"
    )
    (root / "empty" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    message = raises_data_error(
        lambda: load_folder(root, channels=0, **SPLIT), str(root / "empty" / "broken.png"),
        "cannot decode",
    )
    assert "function_node" not in message and "Op:" not in message


def test_folder_missing_not_a_dir_no_classes_and_bad_channels(tmp_path):
    raises_data_error(
        lambda: load_folder(tmp_path / "nope", channels=0, **SPLIT), str(tmp_path / "nope"),
        "does not exist",
    )
    file = tmp_path / "f.png"
    file.write_bytes(b"x")
    raises_data_error(lambda: load_folder(file, channels=0, **SPLIT), str(file), "not a folder")
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "0.png", const_image(1))
    raises_data_error(
        lambda: load_folder(tmp_path / "flat", channels=0, **SPLIT), str(tmp_path / "flat"),
        "no class sub-folders",
    )
    for channels in (2, 4, -1):
        with pytest.raises(ValueError, match="channels"):
            load_folder(tmp_path / "flat", channels=channels, **SPLIT)


def test_folder_single_image_class_cannot_be_split(tmp_path):
    root = tmp_path / "d"
    make_pool_folder(root, {"many": 3, "lonely": 1})
    raises_data_error(
        lambda: load_folder(root, channels=0, **SPLIT), str(root), "'lonely'", "only 1 image"
    )


# -------------------------------------------------------------- split_test


def pool(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pool with counts[c] images of class c, interleaved; image value = unique id."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    y = y[np.random.default_rng(0).permutation(len(y))]
    x = np.arange(len(y)) * 10 + y  # unique id that also encodes the class
    return x, y


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.25, 0.5, 0.9])
def test_split_test_counts_round_half_up(fraction):
    counts = [2, 3, 4, 10, 11, 30]
    x, y = pool(counts)
    x_tr, y_tr, x_te, y_te = split_test(x, y, fraction, seed=5)
    for c, n in enumerate(counts):
        want = int(np.floor(fraction * n + 0.5 + 1e-9))  # decimal ties, e.g. 0.15 * 10 = 1.5
        want = min(max(want, 1), n - 1)
        assert (y_te == c).sum() == want, (c, n)
        assert (y_tr == c).sum() == n - want
    np.testing.assert_array_equal(np.sort(np.concatenate([x_tr, x_te])), np.sort(x))
    np.testing.assert_array_equal(x_tr % 10, y_tr)
    np.testing.assert_array_equal(x_te % 10, y_te)


def test_split_test_deterministic_seeded_and_order_preserving():
    x, y = pool([20, 20, 20])
    first = split_test(x, y, 0.3, seed=7)
    second = split_test(x, y, 0.3, seed=7)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = split_test(x, y, 0.3, seed=8)
    assert not np.array_equal(first[2], other[2])
    position = {int(v): i for i, v in enumerate(x)}
    for part in (first[0], first[2]):
        assert np.all(np.diff([position[int(v)] for v in part]) > 0)


def test_split_test_class_independent_of_other_classes():
    x, y = pool([12, 9])
    _, _, x_te, y_te = split_test(x, y, 0.25, seed=3)
    # Add a third class, interleaved with the others; classes 0 and 1 keep their images.
    extra = np.arange(15) * 10 + 2 + 100000
    x_big, y_big = np.concatenate([x, extra]), np.concatenate([y, np.full(15, 2)])
    order = np.random.default_rng(1).permutation(len(y_big))
    # Keep the relative order of classes 0 and 1 (the split depends on their pool order).
    keep = np.flatnonzero(y_big[order] < 2)
    order[keep] = np.arange(len(y))
    _, _, x_te_big, y_te_big = split_test(x_big[order], y_big[order], 0.25, seed=3)
    for c in (0, 1):
        np.testing.assert_array_equal(np.sort(x_te[y_te == c]), np.sort(x_te_big[y_te_big == c]))
    assert (y_te_big == 2).sum() == 4


def test_split_test_single_image_class_and_bad_fraction():
    x, y = pool([3, 1])
    raises_data_error(lambda: split_test(x, y, 0.5, 0), "class 1", "only 1 image")
    raises_data_error(
        lambda: split_test(x, y, 0.5, 0, class_names=("a", "b"), source="src"),
        "src:", "'b'",
    )
    for fraction in (0.0, 1.0, 2, -1):
        with pytest.raises(ValueError, match="test_fraction"):
            split_test(x, y, fraction, 0)


# --------------------------------------------------------- convert_channels


def test_convert_channels_values():
    rgb = np.array([[[[10, 200, 50], [255, 255, 255]], [[0, 0, 0], [1, 2, 3]]]], np.uint8)
    gray = convert_channels(rgb, 1)
    assert gray.shape == (1, 2, 2, 1) and gray.dtype == np.uint8
    # 0.2989*10 + 0.587*200 + 0.114*50 = 126.089 -> 126; white stays 255; 1,2,3 -> 1.8149 -> 2
    np.testing.assert_array_equal(gray[0, ..., 0], [[126, 255], [0, 2]])
    # Exact ties round up: 0.587*36 + 0.114*12 = 22.5 -> 23 (float64 arithmetic gives 22.4999..).
    tie = convert_channels(np.array([0, 36, 12, 0, 0, 250], np.uint8).reshape(1, 1, 2, 3), 1)
    np.testing.assert_array_equal(tie.ravel(), [23, 29])
    back = convert_channels(gray, 3)
    assert back.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(back, np.repeat(gray, 3, axis=-1))
    assert convert_channels(rgb, 0) is rgb and convert_channels(rgb, 3) is rgb
    assert convert_channels(gray, 1) is gray
    with pytest.raises(ValueError, match="channels"):
        convert_channels(rgb, 2)
    with pytest.raises(ValueError, match="uint8"):
        convert_channels(rgb.astype(np.float32), 1)
