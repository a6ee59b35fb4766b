"""--precision=mixed_float16: float16 compute, float32 state, dynamic loss scaling (issue 23).

On a CPU float16 is slow (no native kernels), so these tests check correctness only:
the gradients the optimizers apply, once unscaled, are float32's; an overflow skips the
step and halves the scale instead of writing inf into the weights.
"""

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.config import Config, ConfigError
from dgm_tf.loss_scaling import is_loss_scaled
from dgm_tf.methods import make_method

FP16 = "mixed_float16"


def _config(method, precision, **kw):
    return Config(method=method, dataset="embedded", class_order=(1, 7, 8), epochs=1, train_examples_per_class=64,
                  batch_size=16, nz=16, ngf=4, ndf=8, precision=precision, **kw)


def _at_task_1(method_name, precision, scenario, **kw):
    """A method past task 0 (untrained: its masks at smax still reserve weights), its
    trainer made for task 1 (replay of task 0, reserved weights)."""
    method = make_method(_config(method_name, precision, **kw), scenario)
    t0, t1 = scenario.tasks[:2]
    method.begin_task(t0)
    method.end_task(t0)
    method.begin_task(t1)
    return method


def _record(optimizer, log):
    """Log, per ``apply_gradients`` call, the gradients divided by the current loss scale."""
    apply = optimizer.apply_gradients

    def recording(grads_and_vars):
        pairs = list(grads_and_vars)
        scale = float(optimizer.dynamic_scale.numpy()) if is_loss_scaled(optimizer) else 1.0
        log.append([g.numpy().astype(np.float64) / scale for g, _ in pairs])
        return apply(pairs)

    optimizer.apply_gradients = recording


def _sync(src, dst):
    for a, b in zip(src.weights, dst.weights):
        b.assign(a)


def test_fp16_dgm_uses_loss_scaled_optimizers_and_float32_state(tiny_scenario):
    method = _at_task_1("dgmw", FP16, tiny_scenario)
    trainer = method.trainer
    assert is_loss_scaled(trainer.d_optimizer) and is_loss_scaled(trainer.g_optimizer)
    assert method.generator.masked_convs[0].compute_dtype == "float16"
    assert method.discriminator.class_head.compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in method.generator.weights + method.discriminator.weights)
    for mask in method.generator.masks(1, 1e4):  # s = 1e4 is representable in float16, 1e5 is not
        assert mask.dtype == tf.float32
    # The loss scale is part of the optimizer state a mid-task checkpoint stores.
    _, arrays, _ = method.checkpoint_state()
    assert any(float(a) == 2.0**15 for k, a in arrays.items() if k.startswith("d_opt/") and np.ndim(a) == 0)


@pytest.mark.parametrize("method_name", ["dgmw", pytest.param("dgma", marks=pytest.mark.slow)])
def test_fp16_unscaled_gradients_match_float32(method_name, tiny_scenario):
    """Three steps of task 1 (real data, replay, reserved weights): before each, the fp16
    method gets the float32 one's weights; every gradient the three updates apply
    (classifier chunks, critic, generator) is compared after unscaling."""
    # clip_norm 1 (the generator's gradient norms are 4-15 here) so that the clip acts:
    # it must clip the true gradient, not the scaled one.
    m32 = _at_task_1(method_name, "float32", tiny_scenario, clip_norm=1.0)
    m16 = _at_task_1(method_name, FP16, tiny_scenario, clip_norm=1.0)
    # Keras's initial 2^15 overflows the critic's float16 kernel gradients for the
    # task's first few steps (measured: 3 of 3 skipped at 2^15, 2^14, 2^13; none at
    # 2^10 over 3 steps): the skip is tested below, here every step must apply.
    for opt in (m16.trainer.d_optimizer, m16.trainer.g_optimizer):
        opt.dynamic_scale.assign(2.0**10)
    logs = {}
    for name, m in (("32", m32), ("16", m16)):
        logs[name + "d"], logs[name + "g"] = [], []
        _record(m.trainer.d_optimizer, logs[name + "d"])
        _record(m.trainer.g_optimizer, logs[name + "g"])
    batches = list(m32.train_dataset(tiny_scenario.tasks[1], 0).take(3))
    worst_cos, worst_norm = 1.0, 0.0
    for batch in batches:
        _sync(m32.generator, m16.generator)
        _sync(m32.discriminator, m16.discriminator)
        m16.trainer.rng.reset(m32.trainer.rng.state)
        m32.trainer.train_step(batch)
        m16.trainer.train_step(batch)
    for kind in ("d", "g"):
        assert len(logs["32" + kind]) == len(logs["16" + kind]) > 0
        for call32, call16 in zip(logs["32" + kind], logs["16" + kind]):
            a = np.concatenate([g.ravel() for g in call32])
            b = np.concatenate([g.ravel() for g in call16])
            assert np.all(np.isfinite(b))
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            worst_cos = min(worst_cos, cos)
            worst_norm = max(worst_norm, abs(np.linalg.norm(b) / np.linalg.norm(a) - 1.0))
    # float16 keeps 11 significant bits. Measured here (AVX2 EPYC, TensorFlow's own
    # float16 kernels, oneDNN on and off alike) over the 12 updates: cosine >= 0.995,
    # norms within 6.5 % (a classifier chunk with a small gradient; the rest within
    # 1.7 %). Bars at 3x those deviations. A gradient left scaled would be off by 2^10.
    assert worst_cos > 0.985
    assert worst_norm < 0.2


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny_scenario):
    method = _at_task_1("dgmw", FP16, tiny_scenario)
    trainer = method.trainer
    batch = next(iter(method.train_dataset(tiny_scenario.tasks[1], 0)))
    # 2^100 fits a float32 loss but overflows every float16 gradient on the way back.
    for opt in (trainer.d_optimizer, trainer.g_optimizer):
        opt.dynamic_scale.assign(2.0**100)
    trained = method.generator.trainable_weights + method.discriminator.trainable_weights
    before = [v.numpy().copy() for v in trained]
    trainer.train_step(batch)
    after = [v.numpy() for v in trained]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # The forward passes still move BN's moving statistics (as in any Keras
    # LossScaleOptimizer step that is skipped), but with finite values.
    assert all(np.all(np.isfinite(v.numpy())) for v in method.generator.weights + method.discriminator.weights)
    # One halving per skipped update: t+1 = 2 classifier chunks and the critic share
    # the discriminator's optimizer, the generator has its own.
    assert float(trainer.d_optimizer.dynamic_scale.numpy()) == 2.0**97
    assert float(trainer.g_optimizer.dynamic_scale.numpy()) == 2.0**99
    assert int(trainer.d_optimizer.iterations.numpy()) == 0
    # At a sane scale the same step trains, and every weight stays finite.
    for opt in (trainer.d_optimizer, trainer.g_optimizer):
        opt.dynamic_scale.assign(2.0**15)
    trainer.train_step(batch)
    moved = [v.numpy() for v in trained]
    assert all(np.all(np.isfinite(m)) for m in moved)
    assert any(np.any(m != b) for m, b in zip(moved, after))


def test_fp16_comparison_classifier_trains_loss_scaled(tiny_scenario):
    method = make_method(_config("finetune", FP16), tiny_scenario)
    t0 = tiny_scenario.tasks[0]
    method.begin_task(t0)
    assert is_loss_scaled(method.trainer.optimizer)
    method.train_task(t0, [])
    assert all(np.all(np.isfinite(v.numpy())) for v in method.network.weights)


def test_fp16_is_refused_where_gradients_are_not_loss_scaled():
    with pytest.raises(ConfigError, match="^--precision: mas does not run in mixed_float16"):
        Config(method="mas", precision=FP16)
    with pytest.raises(ConfigError, match="^--precision: nispa runs in float32 only"):
        Config(method="nispa", precision=FP16)
    with pytest.raises(ConfigError, match="^--precision: dynamos runs in float32 only"):
        Config(method="dynamos", precision=FP16, replay_buffer=500)


_TWO_REPLICAS = r"""
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from dgm_tf.loss_scaling import agree_on_overflow

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for agree in (True, False):
    with strategy.scope():
        v = tf.Variable([1.0, 2.0])
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.1))
        opt.build([v])

    @tf.function
    def step():
        def replica_fn():
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            # Replica 0's share is finite, replica 1's overflowed.
            g = tf.where(rid == 0, tf.constant([1.0, 1.0]), tf.constant([np.inf, 1.0]))
            grads = agree_on_overflow(opt, [g]) if agree else [g]
            opt.apply_gradients(zip(grads, [v]))
        strategy.run(replica_fn)

    step()
    print("agree" if agree else "plain", v.numpy().tolist(), float(opt.dynamic_scale.numpy()))
"""


def test_fp16_an_overflow_on_one_replica_skips_the_step_on_all():
    import subprocess
    import sys

    from tests.test_cli import REPO

    proc = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.strip().splitlines()}
    # With the agreement the step is skipped on both replicas and the scale halved.
    assert lines["agree"] == "[1.0, 2.0] 16384.0"
    # Without it Keras decides from replica 0's finite share and inf reaches the
    # weights: what agree_on_overflow prevents (and proof that this test can fail).
    weights = lines["plain"].split("]")[0]
    assert "nan" in weights or "inf" in weights
