"""Tests for dgm_tf.io_utils: atomic writes, image grids, PNG round trip."""

import json
import os
import stat

import numpy as np
import pytest

from dgm_tf import io_utils


def _files(directory):
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    io_utils.atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n"
    io_utils.atomic_write_text(str(target), "second")
    assert target.read_text() == "second"
    io_utils.atomic_write_bytes(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert _files(target.parent) == ["out.txt"]  # no temp files left behind


def test_atomic_write_text_is_utf8_without_newline_translation(tmp_path):
    target = tmp_path / "t.txt"
    io_utils.atomic_write_text(target, "a\r\nä\n")
    assert target.read_bytes() == "a\r\nä\n".encode("utf-8")


def test_atomic_write_keeps_existing_permissions(tmp_path):
    target = tmp_path / "p.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    io_utils.atomic_write_text(target, "new")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    fresh = tmp_path / "fresh.txt"
    io_utils.atomic_write_text(fresh, "x")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failure_midway_leaves_old_content_and_no_temp_files(tmp_path, monkeypatch, failing):
    target = tmp_path / "results.json"
    io_utils.atomic_write_json(target, {"v": 1})
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(io_utils.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        io_utils.atomic_write_json(target, {"v": 2, "long": "x" * 100_000})
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert _files(tmp_path) == ["results.json"]


def test_keyboard_interrupt_midway_also_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_utils.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        io_utils.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == ["f.bin"]


def test_replacing_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        io_utils.atomic_write_bytes(tmp_path / "d", b"x")
    assert _files(tmp_path) == ["d"]


@pytest.mark.parametrize(
    "obj, exc",
    [
        ({"a": float("nan")}, ValueError),
        ({"a": [1.0, float("inf")]}, ValueError),
        ({"a": object()}, TypeError),
        ({"a": np.float32(1.0)}, TypeError),
    ],
)
def test_atomic_write_json_unencodable_leaves_file_intact(tmp_path, obj, exc):
    target = tmp_path / "r.json"
    io_utils.atomic_write_json(target, {"ok": True})
    before = target.read_text()
    with pytest.raises(exc):
        io_utils.atomic_write_json(target, obj)
    assert target.read_text() == before
    assert _files(tmp_path) == ["r.json"]


def test_atomic_write_json_format(tmp_path):
    target = tmp_path / "r.json"
    obj = {"z": 1, "a": [0.5, None]}
    io_utils.atomic_write_json(target, obj)
    text = target.read_text()
    assert text == json.dumps(obj, indent=2) + "\n"
    assert list(json.loads(text)) == ["z", "a"]  # key order kept, not sorted


def test_atomic_write_type_errors(tmp_path):
    with pytest.raises(TypeError):
        io_utils.atomic_write_bytes(tmp_path / "x", "not bytes")
    with pytest.raises(TypeError):
        io_utils.atomic_write_text(tmp_path / "x", b"not text")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------- image grid


def test_image_grid_shape_and_layout():
    n, h, w, c = 5, 3, 4, 1
    images = np.zeros((n, h, w, c), np.float32)  # 0 -> round(127.5) = 128
    images[4] = 1.0  # image 4 -> 255 everywhere ...
    images[4, 0, 0, 0] = -1.0  # ... except its top-left pixel -> 0
    images[1] = -1.0  # image 1 -> all 0
    pad, ncols = 2, 3
    grid = io_utils.image_grid(images, ncols=ncols, pad=pad, pad_value=1.0)

    # rows = ceil(5 / 3) = 2; height = 2 * (3 + 2) + 2 = 12; width = 3 * (4 + 2) + 2 = 20
    assert grid.shape == (12, 20, 1)
    assert grid.dtype == np.uint8

    # image k at row k // 3, col k % 3, top-left (pad + row*(h+pad), pad + col*(w+pad))
    # image 4 -> row 1, col 1 -> top-left (2 + 5, 2 + 6) = (7, 8)
    assert grid[7, 8, 0] == 0
    np.testing.assert_array_equal(grid[7:10, 8:12, 0].ravel()[1:], 255)
    # image 1 -> row 0, col 1 -> (2, 8)
    np.testing.assert_array_equal(grid[2:5, 8:12], 0)
    # image 0 -> (2, 2): 0.0 maps to 128
    np.testing.assert_array_equal(grid[2:5, 2:6], 128)
    # empty cell (row 1, col 2) -> (7, 14) filled with pad value 255
    np.testing.assert_array_equal(grid[7:10, 14:18], 255)
    # padding: border rows/cols and gaps
    np.testing.assert_array_equal(grid[:2], 255)
    np.testing.assert_array_equal(grid[:, :2], 255)
    np.testing.assert_array_equal(grid[5:7], 255)
    np.testing.assert_array_equal(grid[:, 6:8], 255)


def test_image_grid_value_mapping_clip_and_pad_value():
    images = np.array([-1.0, 1.0, -3.0, 7.0, 0.5]).reshape(5, 1, 1, 1)
    grid = io_utils.image_grid(images, ncols=5, pad=1, pad_value=-1.0)
    # shape: 1 * (1 + 1) + 1 = 3 rows, 5 * (1 + 1) + 1 = 11 cols
    assert grid.shape == (3, 11, 1)
    # cells at (1, 1 + 2k); 0.5 -> round(1.5 * 127.5) = round(191.25) = 191
    assert grid[1, 1::2, 0].tolist() == [0, 255, 0, 255, 191]
    # pad_value -1 -> 0
    assert grid[0].max() == 0 and grid[:, 0].max() == 0


def test_image_grid_rgb_and_no_padding():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 2, 3, 3))
    grid = io_utils.image_grid(images, ncols=2, pad=0)
    assert grid.shape == (4, 6, 3)
    expected = np.clip(np.rint((images + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(grid[2:4, 3:6], expected[3])  # image 3 -> row 1, col 1


@pytest.mark.parametrize(
    "images, kwargs",
    [
        (np.zeros((2, 4, 4)), {}),
        (np.zeros((2, 4, 4, 2)), {}),
        (np.zeros((0, 4, 4, 1)), {}),
        (np.zeros((2, 4, 4, 1)), {"ncols": 0}),
        (np.zeros((2, 4, 4, 1)), {"pad": -1}),
        (np.full((2, 4, 4, 1), np.nan), {}),
        (np.zeros((2, 4, 4, 1)), {"pad_value": float("nan")}),
    ],
)
def test_image_grid_rejects_bad_input(images, kwargs):
    kwargs = {"ncols": 2, **kwargs}
    with pytest.raises(ValueError):
        io_utils.image_grid(images, **kwargs)


# ---------------------------------------------------------------------- PNG


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_round_trip(tmp_path, channels):
    import tensorflow as tf

    rng = np.random.default_rng(channels)
    grid = io_utils.image_grid(rng.uniform(-1, 1, size=(3, 5, 4, channels)), ncols=2)
    target = tmp_path / "samples" / "task_1.png"
    io_utils.save_png(target, grid)
    assert _files(target.parent) == ["task_1.png"]
    decoded = tf.io.decode_png(target.read_bytes(), channels=0).numpy()
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, grid)


def test_save_png_accepts_2d_and_rejects_non_uint8(tmp_path):
    import tensorflow as tf

    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    io_utils.save_png(tmp_path / "g.png", img)
    decoded = tf.io.decode_png((tmp_path / "g.png").read_bytes()).numpy()
    np.testing.assert_array_equal(decoded[:, :, 0], img)
    with pytest.raises(ValueError, match="uint8"):
        io_utils.save_png(tmp_path / "f.png", img.astype(np.float32))
    assert not (tmp_path / "f.png").exists()
