"""--precision=mixed_bfloat16: bf16 convolutions, float32 state, the DGM invariants kept."""

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.config import Config, ConfigError
from dgm_tf.methods.dgm import DGMw
from dgm_tf.models import Discriminator, Generator

BF16 = "mixed_bfloat16"


def _generator_pair():
    """A float32 and a bf16 generator (two tasks, grown) with the same weights."""
    kwargs = dict(nz=16, num_code_classes=3, image_channels=1, task_widths=[(8, 4, 4), (10, 6, 5)],
                  task_classes=[(0,), (1, 2)])
    g32 = Generator(**kwargs)
    g16 = Generator(**kwargs, dtype=BF16)
    rng = np.random.default_rng(0)
    values = [rng.normal(0.0, 0.5, v.shape).astype(np.float32) for v in g32.weights]
    # Moving variances must stay positive.
    values = [np.abs(x) + 0.5 if "variance" in v.path else x for x, v in zip(values, g32.weights)]
    g32.set_weights(values)
    g16.set_weights(values)
    return g32, g16


def test_bf16_generator_keeps_float32_state_and_computes_convolutions_in_bf16():
    g32, g16 = _generator_pair()
    assert all(v.dtype == "float32" for v in g16.weights)
    conv = g16.masked_convs[0]
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    out = conv(tf.zeros([2, 1, 1, 16]), task=1, s=tf.constant(1e4))
    assert out.dtype == tf.bfloat16
    # Masks come from float32 embeddings and a float32 s: identical to float32, even at
    # s = 1e4, which bf16 cannot represent (it rounds to 9984 or 10048).
    for m32, m16 in zip(g32.masks(1, 1e4), g16.masks(1, 1e4)):
        assert m16.dtype == tf.float32
        np.testing.assert_array_equal(m16.numpy(), m32.numpy())


@pytest.mark.parametrize("task, labels", [(0, [0, 0]), (1, [1, 2])])
def test_bf16_generator_output_is_float32_and_close_to_float32(task, labels):
    g32, g16 = _generator_pair()
    labels = tf.constant(labels, tf.int32)
    z = g32.noise(labels, tf.random.Generator.from_seed(1))
    a = g32(z, labels, task=task, s=1e4, training=False).numpy()
    b_tensor = g16(z, labels, task=task, s=1e4, training=False)
    assert b_tensor.dtype == tf.float32
    b = b_tensor.numpy()
    # bf16 keeps 8 significant bits (relative error 2^-9 per rounding) through three
    # layers; tanh outputs agree to a few hundredths, far from a different image.
    # Measured over 5 weight draws: max 0.020 / mean 0.0021 with TensorFlow's own bf16
    # kernels (oneDNN off, what a CPU without AVX-512 runs), max 0.012 / mean 0.0016 with
    # oneDNN's AVX-512 and AVX-512 BF16 ones: 5x and 10x inside the bars.
    assert np.max(np.abs(a - b)) < 0.1
    assert np.mean(np.abs(a - b)) < 0.02
    assert np.std(a) > 0.05  # not a trivially constant image


def test_bf16_discriminator_heads_are_float32_and_gradients_agree():
    d32 = Discriminator(8, 3, 1)
    d16 = Discriminator(8, 3, 1, dtype=BF16)
    d16.set_weights(d32.get_weights())
    assert d16.trunk[1].compute_dtype == "bfloat16"
    assert d16.class_head.compute_dtype == "float32"
    x = tf.random.stateless_uniform([16, 32, 32, 1], seed=[1, 2], minval=-1.0, maxval=1.0)
    y = tf.constant(np.arange(16) % 3, tf.int32)

    def grads(d):
        with tf.GradientTape() as tape:
            critic, logits = d(x, training=True)
            loss = tf.reduce_mean(critic) + tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            )
        assert critic.dtype == tf.float32 and logits.dtype == tf.float32
        return loss, tape.gradient(loss, d.trainable_variables)

    loss32, g32 = grads(d32)
    loss16, g16 = grads(d16)
    # Measured over 5 weight draws, oneDNN off and on (AVX-512, AVX-512 BF16): loss
    # within 0.13 %, every variable's gradient cosine >= 0.997.
    assert abs(float(loss16) - float(loss32)) < 0.02 * abs(float(loss32)) + 1e-3
    for a, b, v in zip(g32, g16, d32.trainable_variables):
        assert b.dtype == tf.float32
        a, b = a.numpy().ravel(), b.numpy().ravel()
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
        assert cosine > 0.98, v.path


def test_bf16_training_keeps_reserved_weights_bit_identical(tiny_scenario):
    cfg = Config(dataset="embedded", class_order=(1, 7, 8), epochs=2, train_examples_per_class=64,
                 batch_size=32, nz=16, ngf=4, ndf=8, precision=BF16)
    method = DGMw(cfg, tiny_scenario)
    t0, t1 = tiny_scenario.tasks[:2]
    method.begin_task(t0)
    method.train_task(t0, [])
    method.end_task(t0)
    method.begin_task(t1)
    assert method.generator.dtype_policy.name == BF16  # growth keeps the policy
    assert method.discriminator.dtype_policy.name == BF16
    kernels = [c.kernel.numpy().copy() for c in method.generator.masked_convs]
    history = method.trainer.fit(method.train_dataset(t1, 0), epochs=1, verbose=0, shuffle=False)
    for name, values in history.history.items():
        assert np.all(np.isfinite(values)), name
    for layer, conv in enumerate(method.generator.masked_convs):
        keep = method.reserved[layer] > 0
        assert keep.any()
        np.testing.assert_array_equal(conv.kernel.numpy()[keep], kernels[layer][keep])
        assert np.any(conv.kernel.numpy()[~keep] != kernels[layer][~keep])
    assert all(v.dtype == "float32" for v in method.trainer.g_optimizer.variables if v.dtype.startswith("float"))


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="--precision"):
        Config(precision="float16")
