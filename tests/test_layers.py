"""Task-masked, growable layers and the networks built from them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.layers import (
    OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS,
    ClassOutputHeads,
    TaskBatchNormalization,
    TaskMaskedConv2DTranspose,
)
from dgm_tf.models import Discriminator, Generator, growth_channels


def _randomise(variables, seed=0):
    rng = np.random.default_rng(seed)
    for v in variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))


def test_masked_conv_applies_sigmoid_gate_per_weight():
    layer = TaskMaskedConv2DTranspose(5, 4, strides=2, padding="same")
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[1, 2])
    layer.build(x.shape)
    _randomise([layer.kernel, layer.task_embeddings[0]])
    s = 3.0
    expected = tf.nn.conv2d_transpose(
        x,
        layer.kernel * tf.sigmoid(s * layer.task_embeddings[0]),
        output_shape=[2, 8, 8, 5],
        strides=2,
        padding="SAME",
    )
    np.testing.assert_allclose(layer(x, task=0, s=s).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_fresh_embedding_gives_half_mask():
    layer = TaskMaskedConv2DTranspose(4, 4)
    layer.build((None, 1, 1, 6))
    np.testing.assert_array_equal(layer.mask(0, 1e4).numpy(), 0.5)
    assert layer.mask(0, 1.0).shape == (4, 4, 4, 6)


def _grown_conv(old, add_in, add_out):
    new = TaskMaskedConv2DTranspose.from_config(old.grown_config(add_out, "random_normal"))
    new.build((None, 4, 4, old.input_channels + add_in))
    new.load_grown_weights(old)
    return new


def test_growth_copies_weights_and_blocks_new_weights_for_old_tasks():
    old = TaskMaskedConv2DTranspose(3, 4, strides=2, padding="same")
    old.build((None, 4, 4, 2))
    _randomise([old.kernel, old.task_embeddings[0]])
    new = _grown_conv(old, add_in=2, add_out=4)
    assert new.kernel.shape == (4, 4, 7, 4)
    assert [e.shape for e in new.task_embeddings] == [(4, 4, 7, 4)] * 2
    assert new.task_filters == (3, 7)
    np.testing.assert_array_equal(new.kernel.numpy()[:, :, :3, :2], old.kernel.numpy())
    emb = np.stack([e.numpy() for e in new.task_embeddings])
    np.testing.assert_array_equal(emb[0, :, :, :3, :2], old.task_embeddings[0].numpy())
    # Old task: -90 on every new weight (new inputs and new outputs).
    assert np.all(emb[0, :, :, 3:, :] == OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS)
    assert np.all(emb[0, :, :, :, 2:] == OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS)
    # New task starts at 0 everywhere, old weights included.
    assert np.all(emb[1] == 0.0)
    # Old task's output on its own channels is unchanged, bit for bit.
    x = tf.random.stateless_normal([2, 4, 4, 2], seed=[3, 4])
    np.testing.assert_array_equal(old(x, task=0, s=7.0).numpy(), new(x, task=0, s=7.0).numpy())
    x_new = tf.random.stateless_normal([2, 4, 4, 4], seed=[3, 4])
    assert new(x_new, task=1, s=1.0).shape == (2, 8, 8, 7)


def test_config_records_grown_sizes_and_is_registered():
    old = TaskMaskedConv2DTranspose(3, 4, name="c")
    old.build((None, 1, 1, 2))
    new = _grown_conv(old, 0, 2)
    config = new.get_config()
    assert config["filters"] == 5 and config["task_filters"] == [3, 5]
    assert keras.saving.get_registered_object("dgm_tf>TaskMaskedConv2DTranspose") is TaskMaskedConv2DTranspose
    clone = keras.layers.deserialize(keras.layers.serialize(new))  # built from its build config
    assert clone.kernel.shape == new.kernel.shape and clone.task_filters == (3, 5)


def test_task_filters_must_end_at_filters():
    with pytest.raises(ValueError, match="task_filters"):
        TaskMaskedConv2DTranspose(4, 4, task_filters=(2, 3))


def test_task_batch_norm_keeps_tasks_apart_and_uses_unbiased_moving_variance():
    bn = TaskBatchNormalization((2, 3), momentum=0.9)
    bn.build((None, 4, 4, 3))
    x = tf.random.stateless_normal([8, 4, 4, 3], seed=[5, 6]) * 3.0 + 1.0
    before = [v.numpy().copy() for v in bn.weights]
    y = bn(x, task=1, training=True)
    # Task 0's variables are untouched by task 1's training call.
    for v, b in zip(bn.weights[:4], before[:4]):
        np.testing.assert_array_equal(v.numpy(), b)
    n = 8 * 4 * 4
    mean = x.numpy().mean(axis=(0, 1, 2))
    var = x.numpy().var(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.moving_means[1].numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variances[1].numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(y.numpy().mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    # Inference uses the moving statistics.
    y_inf = bn(x, task=1, training=False).numpy()
    expected = (x.numpy() - bn.moving_means[1].numpy()) / np.sqrt(bn.moving_variances[1].numpy() + 1e-5)
    np.testing.assert_allclose(y_inf, expected, rtol=1e-4, atol=1e-4)


def test_class_heads_pick_each_sample_its_own_class():
    heads = ClassOutputHeads([3, 3, 5], image_channels=1)
    heads.build((None, 16, 16, 3))
    x = tf.random.stateless_normal([4, 16, 16, 3], seed=[7, 8])
    labels = tf.constant([0, 1, 1, 0])
    out = heads(x, labels=labels, classes=(0, 1)).numpy()
    for i, c in enumerate([0, 1, 1, 0]):
        single = heads(x[i : i + 1], labels=labels[i : i + 1], classes=(c,)).numpy()
        np.testing.assert_allclose(out[i : i + 1], single, rtol=1e-5, atol=1e-6)
    assert out.shape == (4, 32, 32, 1)


def _generator(widths=((24, 12, 6),), classes=((0,),), nz=128, mask_kind="weight"):
    return Generator(
        nz=nz, num_code_classes=10, image_channels=1, task_widths=widths, task_classes=classes, mask_kind=mask_kind
    )


def test_generator_parameter_count_matches_the_reference_architecture():
    # conv1 128*24*16 + conv2 24*12*16 + conv3 12*6*16 + one head 6*1*16
    # + BN gamma/beta 2*(24+12+6) = 49152 + 4608 + 1152 + 96 + 84.
    assert _generator().parameter_count() == 55092


def test_growth_channels_follows_the_reference_rule():
    # conv1: ceil(4097 / (128*16)) = 3 channels.
    # conv2: input grows by 3 -> 3*12*16 = 576 weights; still 1000-576 = 424 missing
    #        over (24+3)*16 = 432 weights per channel -> 1 channel.
    # conv3: input grows by 1 -> 1*6*16 = 96 >= 50 -> nothing more.
    assert growth_channels([4097, 1000, 50], (24, 12, 6), nz=128) == (3, 1, 0)
    assert growth_channels([0, 0, 0], (24, 12, 6), nz=128) == (0, 0, 0)


@pytest.mark.parametrize("mask_kind", ["weight", "activation"])
def test_generator_growth_keeps_every_earlier_task_output(mask_kind):
    keras.utils.set_random_seed(1)
    g = _generator(mask_kind=mask_kind)
    rng = tf.random.Generator.from_seed(0)
    labels = [tf.fill([6], c) for c in range(3)]
    z = [g.noise(lab, rng) for lab in labels]
    _randomise([c.task_embeddings[0] for c in g.masked_convs], seed=1)
    g1 = g.grown((2, 1, 1), (1,))
    _randomise([c.task_embeddings[1] for c in g1.masked_convs], seed=2)
    before0 = g(z[0], labels[0], task=0, s=1e4, training=False).numpy()
    np.testing.assert_array_equal(g1(z[0], labels[0], task=0, s=1e4, training=False).numpy(), before0)
    before1 = g1(z[1], labels[1], task=1, s=1e4, training=False).numpy()
    g2 = g1.grown((3, 2, 1), (2,))
    # Whatever the new task learns (its row, new channels, BN, head) leaves old tasks alone.
    _randomise(
        [c.task_embeddings[2] for c in g2.masked_convs]
        + g2.batch_norms[0].task_variables(2)
        + [g2.heads.kernels[2]],
        seed=4,
    )
    rng_np = np.random.default_rng(5)
    for conv, old in zip(g2.masked_convs, g1.masked_convs):
        k = conv.kernel.numpy()
        o, i = old.kernel.shape[2:]
        k[:, :, o:, :] = rng_np.normal(size=k[:, :, o:, :].shape)
        k[:, :, :, i:] = rng_np.normal(size=k[:, :, :, i:].shape)
        conv.kernel.assign(k)
    np.testing.assert_array_equal(g2(z[0], labels[0], task=0, s=1e4, training=False).numpy(), before0)
    np.testing.assert_array_equal(g2(z[1], labels[1], task=1, s=1e4, training=False).numpy(), before1)
    assert g2.widths == (29, 15, 8)
    assert g2.task_widths == ((24, 12, 6), (26, 13, 7), (29, 15, 8))
    assert g2(z[2], labels[2], task=2, s=1.0).shape == (6, 32, 32, 1)


def test_generator_batch_norm_init_follows_the_reference():
    keras.utils.set_random_seed(4)
    g = _generator().grown((1, 1, 1), (1,))
    first = np.concatenate([bn.gammas[0].numpy() for bn in g.batch_norms])
    later = np.concatenate([bn.gammas[1].numpy() for bn in g.batch_norms])
    # Task 0: N(1, 0.02) (weights_init); later tasks: PyTorch 1.0's default U(0, 1).
    assert abs(first.mean() - 1.0) < 0.02 and first.std() < 0.05
    assert later.min() >= 0.0 and later.max() < 1.0 and later.std() > 0.15


def test_grown_generator_round_trips_through_keras_file(tmp_path):
    keras.utils.set_random_seed(2)
    g = _generator().grown((1, 1, 1), (1,))
    rng = tf.random.Generator.from_seed(0)
    lab = tf.fill([3], 1)
    z = g.noise(lab, rng)
    path = tmp_path / "g.keras"
    g.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.task_widths == g.task_widths
    np.testing.assert_allclose(
        loaded(z, lab, task=1, s=50.0, training=False).numpy(),
        g(z, lab, task=1, s=50.0, training=False).numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_noise_carries_one_hot_code_of_labels():
    g = _generator()
    z = g.noise(tf.constant([3, 0, 9]), tf.random.Generator.from_seed(0)).numpy()
    np.testing.assert_array_equal(z[:, :10], np.eye(10, dtype=np.float32)[[3, 0, 9]])
    assert z.shape == (3, 128) and np.std(z[:, 10:]) > 0.5


def test_discriminator_shapes_and_head_growth_copies_old_rows():
    keras.utils.set_random_seed(3)
    d = Discriminator(8, 2, 1)
    x = tf.random.stateless_uniform([3, 32, 32, 1], seed=[1, 1], minval=-1, maxval=1)
    critic, logits = d(x, training=False)
    assert critic.shape == (3,) and logits.shape == (3, 2)
    wider = d.with_classes(4)
    critic2, logits2 = wider(x, training=False)
    np.testing.assert_allclose(logits2[:, :2].numpy(), logits.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(critic2.numpy(), critic.numpy(), rtol=1e-6, atol=1e-6)
    # 32 -> 16 -> 8 -> 4 spatial, 4*ndf channels into both heads.
    assert d.class_head.kernel.shape == (4 * 8 * 4 * 4, 2)


# -- activation masks (DGMa) -------------------------------------------------------------


def test_activation_mask_gates_each_output_channel_before_anything_else():
    layer = TaskMaskedConv2DTranspose(5, 4, strides=2, padding="same", mask_kind="activation")
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[1, 2])
    layer.build(x.shape)
    _randomise([layer.kernel, layer.task_embeddings[0]])
    assert layer.mask_shape == (5,) and layer.task_embeddings[0].shape == (5,)
    s = 3.0
    plain = tf.nn.conv2d_transpose(x, layer.kernel, output_shape=[2, 8, 8, 5], strides=2, padding="SAME")
    gate = 1.0 / (1.0 + np.exp(-s * layer.task_embeddings[0].numpy()))
    np.testing.assert_allclose(
        layer(x, task=0, s=s).numpy(), plain.numpy() * gate[None, None, None, :], rtol=1e-5, atol=1e-5
    )
    # A channel whose gate is shut outputs exactly zero.
    e = layer.task_embeddings[0].numpy()
    e[2] = -90.0
    layer.task_embeddings[0].assign(e)
    assert np.all(layer(x, task=0, s=1e5).numpy()[..., 2] == 0.0)


def test_activation_masked_growth_blocks_new_channels_for_old_tasks():
    old = TaskMaskedConv2DTranspose(3, 4, strides=2, padding="same", mask_kind="activation")
    old.build((None, 4, 4, 2))
    _randomise([old.kernel, old.task_embeddings[0]])
    new = _grown_conv(old, add_in=2, add_out=4)
    assert new.mask_kind == "activation" and new.get_config()["mask_kind"] == "activation"
    assert [e.shape for e in new.task_embeddings] == [(7,), (7,)]
    np.testing.assert_array_equal(new.task_embeddings[0].numpy()[:3], old.task_embeddings[0].numpy())
    assert np.all(new.task_embeddings[0].numpy()[3:] == OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS)
    assert np.all(new.task_embeddings[1].numpy() == 0.0)
    x = tf.random.stateless_normal([2, 4, 4, 2], seed=[3, 4])
    np.testing.assert_array_equal(old(x, task=0, s=7.0).numpy(), new(x, task=0, s=7.0).numpy())
    weight_masked = TaskMaskedConv2DTranspose(3, 4, strides=2, padding="same")
    weight_masked.build((None, 4, 4, 2))
    with pytest.raises(ValueError, match="activation-masked"):
        new.load_grown_weights(weight_masked)


def test_unknown_mask_kind_is_rejected():
    with pytest.raises(ValueError, match="mask_kind"):
        TaskMaskedConv2DTranspose(4, 4, mask_kind="channel")


def test_dgma_generator_has_channel_masks_and_one_head_per_task():
    keras.utils.set_random_seed(3)
    g = _generator(widths=((20, 10, 5),), classes=((0, 1),), mask_kind="activation")
    assert [tuple(m.shape) for m in g.masks(0, 1.0)] == [(20,), (10,), (5,)]
    assert len(g.heads.kernels) == 1  # two classes, one head (approaches/DGMa.py)
    g1 = g.grown((3, 2, 1), (2, 3))
    assert [tuple(m.shape) for m in g1.masks(1, 1.0)] == [(23,), (12,), (6,)]
    assert len(g1.heads.kernels) == 2 and g1.heads.kernels[1].shape == (4, 4, 1, 6)
    head_vars = [v for v in g1.task_trainable_variables(1) if "heads" in v.path]
    assert head_vars == [g1.heads.kernels[1]]
    # Same architecture per class under weight masks: one head per class.
    assert len(_generator(classes=((0, 1),)).heads.kernels) == 2


def test_dgma_initialisation_follows_the_reference():
    """net_DGMa.py: the first kernels are N(0, 0.02) (weights_init); grown kernels are
    re-drawn Xavier-uniform with ReLU gain (weights_init_g) before the old slice is copied
    back: the reverse of DGMw's order."""
    keras.utils.set_random_seed(5)
    g = _generator(widths=((80, 40, 20),), mask_kind="activation")
    k2 = g.masked_convs[1].kernel.numpy()
    assert abs(k2.std() - 0.02) < 0.002
    g1 = g.grown((40, 20, 10), (1,))
    k2 = g1.masked_convs[1].kernel.numpy()  # (4, 4, 60, 120)
    new_part = k2[:, :, 40:, :]
    bound = np.sqrt(2.0) * np.sqrt(6.0 / (16 * (60 + 120)))
    assert new_part.max() <= bound and new_part.min() >= -bound
    assert abs(new_part.std() - bound / np.sqrt(3.0)) < 0.1 * bound
    dgmw = _generator(widths=((80, 40, 20),))
    assert dgmw.masked_convs[1].kernel.numpy().std() > 0.03  # Xavier, not N(0, 0.02)
