"""The reference's ImageNet critic, ResNet-18 (dgm_tf.models.resnet_critic), and DGM
training with it (``--critic=resnet18``)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf import engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.methods import dgm
from dgm_tf.models.resnet_critic import ResNet18Critic


def _trainable(checkpoint, fresh):
    """The checkpoint's discriminator arrays of the trainable variables (``fresh``'s
    weights order: trainable ones are those of ``fresh.trainable_variables``)."""
    arrays = [v for k, v in sorted(checkpoint.arrays.items()) if k.startswith("discriminator/")]
    trainable = {id(v) for v in fresh.trainable_variables}
    return [a for a, v in zip(arrays, fresh.weights) if id(v) in trainable]


def _expected_trainable(channels, classes, features=2048):
    """Trainable parameters of the layout, counted by hand: convolutions without bias,
    BN gamma and beta, the fc, the features' BN and the two heads."""
    total = 3 * 3 * channels * 64 + 2 * 64  # stem conv + BN
    width = 64
    for stage, out in enumerate((64, 128, 256, 512)):
        for j in range(2):
            total += 3 * 3 * width * out + 2 * out + 3 * 3 * out * out + 2 * out
            if width != out:  # the first block of stages 2-4: 1x1 shortcut + BN
                total += width * out + 2 * out
            width = out
    trunk = total
    total += 512 * features + features + 2 * features  # fc, feature BN
    total += features + 1 + features * classes + classes  # critic, class head
    return trunk, total


def test_shapes_and_parameter_count_are_the_reference_layout():
    critic = ResNet18Critic(10, image_channels=3)
    out_critic, logits = critic(tf.zeros([4, 32, 32, 3]), training=False)
    assert out_critic.shape == (4,) and logits.shape == (4, 10)
    assert out_critic.dtype == tf.float32 and logits.dtype == tf.float32
    trunk, total = _expected_trainable(3, 10)
    # The CIFAR ResNet-18 the reference builds on (kuangliu's layout) has 11,173,962
    # parameters with its 512 -> 10 classifier: 11,168,832 without it.
    assert trunk == 11_168_832
    assert sum(int(np.prod(v.shape)) for v in critic.trainable_variables) == total
    # Non-trainable: the moving mean and variance of every BN (17 2D + 3 shortcut + 1 1D).
    bn_channels = 64 + 4 * 64 + 4 * 128 + 4 * 256 + 4 * 512 + 128 + 256 + 512 + 2048
    assert sum(int(np.prod(v.shape)) for v in critic.non_trainable_variables) == 2 * bn_channels
    assert ResNet18Critic(3, image_channels=1)(tf.zeros([2, 32, 32, 1]))[1].shape == (2, 3)


def test_wider_head_keeps_every_weight_and_the_old_logits():
    critic = ResNet18Critic(2, image_channels=3)
    images = tf.random.stateless_uniform([6, 32, 32, 3], seed=[1, 2], minval=-1.0, maxval=1.0)
    before_c, before_l = critic(images, training=False)
    wider = critic.with_classes(5)
    after_c, after_l = wider(images, training=False)
    np.testing.assert_array_equal(before_c.numpy(), after_c.numpy())
    np.testing.assert_array_equal(before_l.numpy(), after_l.numpy()[:, :2])
    assert after_l.shape == (6, 5)
    with pytest.raises(ValueError):
        wider.with_classes(4)


def test_gradient_penalty_runs_through_training_mode_batch_norm():
    """The reference's penalty: the critic's gradient at interpolates, BN in training
    mode; a second-order gradient reaches every trainable weight of the trunk."""
    critic = ResNet18Critic(2, image_channels=3)
    x = tf.random.stateless_uniform([4, 32, 32, 3], seed=[3, 4], minval=-1.0, maxval=1.0)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(x)
            out, _ = critic(x, training=True)
            total = tf.reduce_sum(out)
        g = inner.gradient(total, x)
        gp = tf.reduce_mean(tf.square(tf.norm(tf.reshape(g, [4, -1]), axis=1) - 1.0))
    grads = outer.gradient(gp, critic.trainable_variables)
    missing = [v.path for v, gr in zip(critic.trainable_variables, grads) if gr is None]
    # The class head does not enter the critic's output, nor its bias the gradient.
    assert sorted(p.split("/", 1)[1] for p in missing) == ["classifier/bias", "classifier/kernel", "critic/bias"]
    assert np.isfinite(float(gp))


def test_critic_flag_is_validated():
    with pytest.raises(ConfigError, match="^--critic: unknown critic 'vgg'"):
        Config(critic="vgg")
    with pytest.raises(ConfigError, match="^--critic: the critic is DGM's discriminator"):
        Config(method="mas", critic="resnet18")
    assert Config(method="dgmw", critic="resnet18").critic == "resnet18"


# Slow (21 s for one task, 60 s for two on 2 cores: tracing a ResNet-18 critic's double
# backward): the layer-level tests above stay in the default run, which sits near its
# 8-minute budget.
@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2])
def test_dgmw_trains_with_the_resnet18_critic(tmp_path, tasks, monkeypatch):
    """One-class tasks of RGB images (the embedded sample as 3 channels), one step each:
    DGMw's discriminator, generator and classifier updates run on the ResNet-18 critic
    (with two tasks the head grows for the second), and the
    checkpoint holds its weights, finite and of the layout's shapes."""
    config = Config(method="dgmw", critic="resnet18", dataset="embedded", channels=3, class_order=(1, 7)[:tasks],
                    train_examples_per_class=8, batch_size=8, epochs=1, nz=16, ngf=4, eval_every=1,
                    samples_per_class=2, export=False, log_every_steps=1)
    started = {}
    begin = dgm.DGM.begin_task

    def recording_begin(self, task):
        begin(self, task)
        assert isinstance(self.discriminator, ResNet18Critic)
        started[task.index] = [v.numpy().copy() for v in self.discriminator.trainable_variables]

    monkeypatch.setattr(dgm.DGM, "begin_task", recording_begin)
    results = engine.run_experiment(config, tmp_path / "wd")
    assert results["tasks_completed"] == tasks and results["config"]["critic"] == "resnet18"
    latest = CheckpointManager(tmp_path / "wd" / "ckpt").latest()
    weights = [v for k, v in sorted(latest.arrays.items()) if k.startswith("discriminator/")]
    fresh_model = ResNet18Critic(tasks, image_channels=3)
    fresh = fresh_model.weights
    assert [tuple(np.shape(w)) for w in weights] == [tuple(v.shape) for v in fresh]
    assert all(np.isfinite(w).all() for w in weights)
    # Trained: Adam's step moved the trunk's weights in the last task.
    moved = [not np.array_equal(a, b) for a, b in zip(started[tasks - 1], _trainable(latest, fresh_model))]
    assert np.mean(moved) > 0.9, np.mean(moved)
    assert "--critic=resnet18" in (tmp_path / "wd" / "flags.txt").read_text().splitlines()
    assert json.loads((tmp_path / "wd" / "results.json").read_text())["accuracy_matrix"][-1][-1] is not None
