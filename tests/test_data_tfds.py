"""The tfds: source (under tfds.testing.mock_data, never a download), the paper's
flagfiles, random class orders and the offline fail-fast path."""

import dataclasses
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dgm_tf.config import Config, ConfigError
from dgm_tf.data import DataError, load_dataset, make_scenario, resolve_class_order
from dgm_tf.data.tfds_source import KNOWN_BUILDERS, load_tfds
from dgm_tf.engine import build_scenario
from tests.test_cli import REPO, parse_flags, run_cli

EXPECTED = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "svhn_cropped": ((32, 32, 3), 10),
    "cifar10": ((32, 32, 3), 10),
    "imagenet_resized/32x32": ((32, 32, 3), 1000),
}


def test_every_known_builder_is_covered():
    assert set(KNOWN_BUILDERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builder_loads_under_mock_data_with_its_real_features(name, tmp_path):
    shape, num_classes = EXPECTED[name]
    with tfds.testing.mock_data(num_examples=12):
        raw = load_tfds(name, data_dir=str(tmp_path))
    assert raw.name == f"tfds:{name}"
    assert raw.image_shape == shape and raw.num_classes == num_classes
    assert raw.x_train.dtype == np.uint8 and raw.x_train.shape == (12,) + shape
    assert raw.x_test.shape == (12,) + shape
    assert raw.y_train.dtype == np.int64 and 0 <= raw.y_train.min() and raw.y_train.max() < num_classes


def _labelled_mock(per_class_train=6, per_class_test=2):
    """Mock as_dataset: every class present, each image filled with its label % 251 so
    a test can check that images and labels stay paired. Honours ``SkipDecoding`` as
    TFDS does: the image comes PNG-encoded and the reader must decode it."""

    def as_dataset(self, split, decoders=None, **kwargs):
        del kwargs
        num_classes = self.info.features["label"].num_classes
        shape = self.info.features["image"].shape
        n = per_class_train if split == "train" else per_class_test
        labels = np.repeat(np.arange(num_classes), n)
        images = np.broadcast_to((labels % 251).astype(np.uint8)[:, None, None, None], (len(labels),) + shape)
        ds = tf.data.Dataset.from_tensor_slices({"image": images.copy(), "label": labels})
        if decoders and "image" in decoders:
            ds = ds.map(lambda ex: {"image": tf.io.encode_png(ex["image"]), "label": ex["label"]})
        return ds

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_select_reads_only_the_chosen_classes_and_keeps_pairs(tmp_path):
    seen = []

    def select(ids):
        seen.append(list(ids))
        return [7, 3]

    with _labelled_mock():
        raw = load_tfds("cifar10", data_dir=str(tmp_path), select=select)
    assert seen == [list(range(10))]
    assert sorted(set(raw.y_train.tolist())) == [3, 7] and len(raw.y_train) == 12
    assert sorted(set(raw.y_test.tolist())) == [3, 7] and len(raw.y_test) == 4
    assert raw.num_classes == 10  # class ids keep their meaning
    np.testing.assert_array_equal(raw.x_train[:, 0, 0, 0], raw.y_train)
    np.testing.assert_array_equal(raw.x_test[:, 5, 5, 2], raw.y_test)


def test_imagenet_uses_its_validation_split_as_test(tmp_path):
    splits = []

    def as_dataset(self, split, **kwargs):
        splits.append(split)
        return tf.data.Dataset.from_tensor_slices(
            {"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.array([0, 1])}
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        load_tfds("imagenet_resized/32x32", data_dir=str(tmp_path))
        load_tfds("cifar10", data_dir=str(tmp_path))
    assert splits == ["train", "validation", "train", "test"]


def test_channels_flag_converts_tfds_images(tmp_path):
    with _labelled_mock():
        gray = load_dataset("tfds:cifar10", data_dir=str(tmp_path), channels=1)
        rgb = load_dataset("tfds:mnist", data_dir=str(tmp_path), channels=3)
    assert gray.image_shape == (32, 32, 1) and rgb.image_shape == (28, 28, 3)
    # A grey pixel v (all channels equal) stays v under the luma weights (sum 1.0).
    np.testing.assert_array_equal(gray.x_train[:, 0, 0, 0], gray.y_train % 251)
    np.testing.assert_array_equal(rgb.x_train[..., 0], rgb.x_train[..., 2])


@pytest.mark.parametrize(
    "cfg, tasks, classes_per_task, shape, first_task",
    [
        ("svhn_dgmw.cfg", 10, 1, (32, 32, 3), (0,)),
        ("svhn_dgma.cfg", 10, 1, (32, 32, 3), (0,)),
        ("cifar10_dgmw.cfg", 10, 1, (32, 32, 3), (0,)),
        ("imagenet32_dgmw.cfg", 10, 10, (32, 32, 3), (449, 390, 497, 469, 483, 489, 401, 409, 410, 419)),
        ("mnist_dgmw.cfg", 10, 1, (32, 32, 1), (0,)),
    ],
)
def test_paper_flagfiles_parse_and_build_their_scenarios(cfg, tasks, classes_per_task, shape, first_task, tmp_path):
    config = parse_flags(f"--flagfile={REPO / 'configs' / cfg}", "--workdir=unused")
    config = dataclasses.replace(config, data_dir=str(tmp_path))
    with _labelled_mock():
        scenario = build_scenario(config)
    assert scenario.num_tasks == tasks and scenario.classes_per_task == classes_per_task
    assert scenario.image_shape == shape
    assert scenario.tasks[0].classes == first_task
    assert sorted(c for t in scenario.tasks for c in t.classes) == sorted(scenario.class_order)
    for task in scenario.tasks:
        assert len(task.y_train) > 0 and len(task.y_val) > 0 and len(task.y_test) > 0


def test_imagenet_config_picks_the_reference_synsets(tmp_path):
    """Task t holds the synsets the reference's ImageFolder indices i + 100 t name."""
    config = parse_flags(f"--flagfile={REPO / 'configs' / 'imagenet32_dgmw.cfg'}", "--workdir=unused")
    names = tfds.builder("imagenet_resized/32x32", data_dir=str(tmp_path), try_gcs=False).info.features[
        "label"
    ].names
    synsets = [names[c] for c in config.class_order]
    ordered = sorted(names)
    reference = [ordered[i + 100 * t] for t in range(10) for i in (1, 15, 29, 45, 59, 65, 81, 89, 90, 99)]
    assert synsets == reference
    assert synsets[0] == "n01443537"  # goldfish, ILSVRC class 1
    assert config.critic == "resnet18"  # the reference's ImageNet netD (networks/net_DGMw_imnet.py)


def test_random_class_order_is_seeded_and_identical_through_select(tmp_path):
    order = resolve_class_order("random:5", range(10))
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert resolve_class_order("random:5", list(range(10))[::-1]) == order
    assert resolve_class_order("random:6", range(10)) != order
    with _labelled_mock():
        config = Config(dataset="tfds:cifar10", data_dir=str(tmp_path), class_order="random:5",
                        classes_per_task=2, num_tasks=3)
        scenario = build_scenario(config)
    assert list(scenario.class_order) == order[:6]  # tfds read only these six classes
    with _labelled_mock():
        raw = load_dataset("tfds:cifar10", data_dir=str(tmp_path))
    direct = make_scenario(raw, class_order="random:5", classes_per_task=2, num_tasks=3)
    assert direct.class_order == scenario.class_order


@pytest.mark.parametrize("bad", ["random:", "random:x", "random:-1", "shuffled"])
def test_bad_random_class_order_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--class_order"):
        Config(class_order=bad)


def test_cli_accepts_random_class_order_and_writes_it_back(tmp_path):
    config = parse_flags("--class_order=random:3", "--workdir=unused")
    assert config.class_order == "random:3"
    assert "--class_order=random:3" in config.to_flags()


def test_offline_tfds_fails_within_seconds_and_writes_nothing(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    workdir = tmp_path / "wd"
    start = time.monotonic()
    # The timeout guards the behaviour this replaces: tfds.load retrying for minutes.
    proc = run_cli("--dataset=tfds:mnist", f"--data_dir={empty}", f"--workdir={workdir}", timeout=120)
    assert time.monotonic() - start < 120
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr[-2000:]
    assert "tfds:mnist" in error[0] and "--download" in error[0] and "tfds build mnist" in error[0]
    assert str(empty) in error[0]
    assert not workdir.exists() and not any(empty.iterdir())


@pytest.mark.parametrize(
    "spec, data_dir, needle",
    [
        ("tfds:no_such_dataset", None, "no such TFDS builder"),
        ("tfds:mnist/nope", None, "tfds:mnist/nope"),
        ("tfds:", None, "builder name"),
        ("tfds:mnist", "/nonexistent/tfds_dir", "/nonexistent/tfds_dir"),
    ],
)
def test_bad_tfds_specs_name_the_problem(spec, data_dir, needle, tmp_path):
    with pytest.raises(DataError, match=needle.replace("/", ".")):
        load_dataset(spec, data_dir=data_dir if data_dir is not None else str(tmp_path))
