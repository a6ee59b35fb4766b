"""DGMw and DGMa: the pure pieces against hand-computed values, and the training invariants."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.config import Config
from dgm_tf.methods.dgm import (
    DGMa,
    DGMw,
    hat_embedding_gradient_scale,
    kernel_gradient_masks,
    mask_regularizer,
    pad_reserved,
    s_schedule,
    scaled_lambda_mask,
    update_reserved,
)


def test_s_schedule_matches_reference_formula_by_hand():
    # smax = 100, 10 epochs, epoch 5: s_ep = (100 - 0.01) * 5/10 + 0.01 = 50.005.
    s_ep, s = s_schedule(5, 10, 0, 640, 100.0)
    assert s_ep == pytest.approx(50.005)
    assert s == pytest.approx(1 / 50.005)  # first batch: 1/s_ep
    # Half way through the epoch: (50.005 - 1/50.005) * 0.5 + 1/50.005.
    _, s_half = s_schedule(5, 10, 320, 640, 100.0)
    assert s_half == pytest.approx((50.005 - 1 / 50.005) * 0.5 + 1 / 50.005)
    # Epoch 0 starts at s = smax and ramps *down* (reference quirk kept on purpose).
    s_ep0, s0 = s_schedule(0, 10, 0, 640, 100.0)
    assert s_ep0 == pytest.approx(0.01) and s0 == pytest.approx(100.0)
    assert s_schedule(0, 10, 600, 640, 100.0)[1] < s0


def test_dgma_s_is_constant_within_an_epoch():
    # approaches/DGMa.py: s_g = s_g_max for every batch of the epoch.
    for offset in (0, 320, 600):
        s_ep, s = s_schedule(5, 10, offset, 640, 100.0, per_batch=False)
        assert s_ep == s == pytest.approx(50.005)
    # So the HAT factor's s_ep / s is 1: (cosh(clamp(s e)) + 1) / (cosh(e) + 1).
    expected = (math.cosh(50.005 * 0.3) + 1) / (math.cosh(0.3) + 1)
    assert float(hat_embedding_gradient_scale(0.3, s, s_ep)) == pytest.approx(expected, rel=1e-5)


def test_kernel_gradient_masks_by_hand():
    # Weight masks: 1 - reserved, elementwise.
    r = np.array([[[[1.0, 0.0]]]], np.float32)
    np.testing.assert_array_equal(kernel_gradient_masks("weight", [r], [r.shape])[0], [[[[0.0, 1.0]]]])
    # Activation masks, kernels (k, k, out, in), k = 1: layer 1 reads the noise (3
    # entries), so its factor is 1 - post; layer 2's weight (o, i) is frozen only when
    # both its output channel o and its input channel i (layer 1's output) are reserved.
    post1 = np.array([1.0, 0.0], np.float32)
    post2 = np.array([0.0, 1.0, 1.0], np.float32)
    f1, f2 = kernel_gradient_masks("activation", [post1, post2], [(1, 1, 2, 3), (1, 1, 3, 2)])
    np.testing.assert_array_equal(f1[0, 0], [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(f2[0, 0], [[1, 1], [0, 1], [0, 1]])
    assert f1.shape == (1, 1, 2, 3) and f2.dtype == np.float32


def test_mask_regularizer_first_task_is_mean_mask():
    m = [tf.constant([[0.2, 0.4]]), tf.constant([0.9])]
    # (0.2 + 0.4 + 0.9) / 3
    assert float(mask_regularizer(m, None)) == pytest.approx(0.5)


def test_mask_regularizer_counts_only_free_weights():
    m = [tf.constant([0.2, 0.4, 1.0]), tf.constant([0.9, 0.1])]
    reserved = [np.array([0.0, 1.0, 1.0], np.float32), np.array([0.0, 0.0], np.float32)]
    # free weights: 0.2 (layer 1) and 0.9, 0.1 (layer 2): (0.2 + 0.9 + 0.1) / 3 = 0.4
    assert float(mask_regularizer(m, reserved)) == pytest.approx(0.4)
    ones = [tf.ones([3]), tf.ones([2])]
    assert 0.0 <= float(mask_regularizer(ones, reserved)) <= 1.0


def test_hat_scale_matches_hand_computation_and_clamps():
    # e = 0.5, s = 2, s_ep = 4: (4/2) * (cosh(1) + 1) / (cosh(0.5) + 1)
    expected = 2 * (math.cosh(1.0) + 1) / (math.cosh(0.5) + 1)
    assert float(hat_embedding_gradient_scale(0.5, 2.0, 4.0)) == pytest.approx(expected, rel=1e-6)
    # s*e = 100 is clamped to 50: (1/1000) * (cosh(50) + 1) / (cosh(0.1) + 1) with s = 1000, s_ep = 1
    expected = (1 / 1000) * (math.cosh(50) + 1) / (math.cosh(0.1) + 1)
    assert float(hat_embedding_gradient_scale(0.1, 1000.0, 1.0)) == pytest.approx(expected, rel=1e-5)
    # An earlier task's -90 entries give a zero factor, not NaN.
    assert float(hat_embedding_gradient_scale(-90.0, 1e4, 1e4)) == 0.0


def test_lambda_mask_scales_with_generator_size():
    assert scaled_lambda_mask(0.08, (24, 12, 6), (24, 12, 6)) == pytest.approx(0.08)
    assert scaled_lambda_mask(0.08, (48, 24, 12), (24, 12, 6)) == pytest.approx(0.16)


def test_reserved_masks_union_binarise_and_pad():
    r = update_reserved(None, [np.array([0.2, 0.5, 0.9])])
    np.testing.assert_array_equal(r[0], [0, 1, 1])
    r = update_reserved(r, [np.array([0.7, 0.1, 0.0])])
    np.testing.assert_array_equal(r[0], [1, 1, 1])
    padded = pad_reserved([np.ones((4, 4, 2, 3), np.float32)], [(4, 4, 3, 5)])[0]
    assert padded.shape == (4, 4, 3, 5)
    assert padded.sum() == 4 * 4 * 2 * 3 and padded[:, :, 2:, :].sum() == 0 and padded[..., 3:].sum() == 0


def _tiny_config(**overrides):
    base = dict(
        dataset="embedded", class_order=(1, 7, 8), epochs=2, train_examples_per_class=64,
        batch_size=32, nz=16, ngf=4, ndf=8, eval_every=1,
    )
    base.update(overrides)
    return Config(**base)


def _snapshot(generator):
    return {v.path: v.numpy().copy() for v in generator.weights}


def _reserved_weights(method, layer):
    """Kernel entries (k, k, out, in) earlier tasks reserved, from the method's reserved
    masks: the weights themselves (DGMw), or the weights between two reserved channels
    (DGMa; the first layer's inputs are the noise)."""
    r = method.reserved[layer] > 0
    shape = tuple(method.generator.masked_convs[layer].kernel.shape)
    if isinstance(method, DGMw):
        return r
    pre = np.ones(shape[3], bool) if layer == 0 else method.reserved[layer - 1] > 0
    return np.broadcast_to(r[:, None] & pre[None, :], shape)


@pytest.mark.parametrize("method_cls", [DGMw, DGMa])
def test_training_next_task_leaves_reserved_weights_bit_identical(tiny_scenario, method_cls):
    cfg = _tiny_config()
    method = method_cls(cfg, tiny_scenario)
    t0, t1 = tiny_scenario.tasks[:2]
    method.begin_task(t0)
    method.train_task(t0, [])
    method.end_task(t0)
    reserved = [r.copy() for r in method.reserved]
    assert all(r.sum() > 0 for r in reserved), "task 0 reserved nothing"
    rng = tf.random.Generator.from_seed(3)
    labels0 = tf.constant(t0.labels[:1] * 16, tf.int32)
    z0 = method.generator.noise(labels0, rng)
    images0 = method.generator(z0, labels0, task=0, s=cfg.smax, training=False).numpy()
    method.begin_task(t1)
    before = _snapshot(method.generator)
    method.train_task(t1, [])
    after = _snapshot(method.generator)
    for layer, conv in enumerate(method.generator.masked_convs):
        k_before = before[conv.kernel.path]
        k_after = after[conv.kernel.path]
        keep = _reserved_weights(method, layer)
        assert keep.any()
        np.testing.assert_array_equal(k_after[keep], k_before[keep])
        assert np.any(k_after[~keep] != k_before[~keep]), "free weights did not train"
        # Task 0's embedding row is not touched either.
        np.testing.assert_array_equal(
            after[conv.task_embeddings[0].path], before[conv.task_embeddings[0].path]
        )
    for path in before:
        if path.endswith("_0") or path.endswith("kernel_0"):
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    # What a user sees: task 0's generated images (same noise, s = smax) barely move.
    # Weights task 0 did not reserve may change. DGMw: its mask there is < 0.5, ~0 once
    # binary (after 2 epochs it is not quite: 0.002 was measured). DGMa: a channel task 0
    # switched off still feeds BN's beta forward, and the weights reading it are free, so
    # task 0's output moves a little even with binary masks (inherited from the
    # reference; WORKSPACE.md "DGMa"); 0.0003 was measured here.
    images0_after = method.generator(z0, labels0, task=0, s=cfg.smax, training=False).numpy()
    print("max change of task 0's images:", np.abs(images0_after - images0).max())
    np.testing.assert_allclose(images0_after, images0, atol=1e-2)


@pytest.mark.parametrize("method_cls", [DGMw, DGMa])
def test_mask_at_smax_is_binary_after_training(tiny_scenario, method_cls):
    # 20 iterations; embeddings grow steadily, so longer runs are more binary still
    # (the quickstart's method_state records the same fraction per task).
    method = method_cls(_tiny_config(epochs=10), tiny_scenario)
    t0 = tiny_scenario.tasks[0]
    method.begin_task(t0)
    method.train_task(t0, [])
    method.end_task(t0)
    masks = np.concatenate([m.numpy().ravel() for m in method.generator.masks(0, 1e4)])
    undecided = np.mean((masks > 0.01) & (masks < 0.99))
    assert undecided < 0.02
    assert method.history[-1]["task_mask_undecided_fraction"] == pytest.approx(undecided)
    assert 0.0 < np.mean(masks >= 0.5) < 1.0


def test_replay_draws_every_past_class_in_the_right_counts(tiny_scenario):
    method = DGMw(_tiny_config(), tiny_scenario)
    t0, t1, t2 = tiny_scenario.tasks
    for task in (t0, t1):
        method.begin_task(task)
        method.end_task(task)
    method.begin_task(t2)
    assert len(method.replay) == 2
    for past, (x, y) in zip((t0, t1), method.replay):
        assert x.shape == (len(t2.x_train),) + tiny_scenario.image_shape
        np.testing.assert_array_equal(np.unique(y), past.labels)
        assert np.all(np.abs(x) <= 1.0) and x.std() > 0
    # The stored images are the generator's output for those labels and tasks.
    x, y = method.replay[1]
    regenerated = method.generate(y[:4], task=1, seed=0)
    assert regenerated.shape == x[:4].shape
    # Different classes use different task masks and heads: their means differ.
    assert not np.allclose(method.replay[0][0].mean(0), method.replay[1][0].mean(0))


def test_stale_training_function_trap_is_avoided(tiny_scenario):
    """After growth a cached train function keeps training the pre-growth variables
    without error (seen with Keras 3). The method must train the grown generator."""
    method = DGMw(_tiny_config(epochs=1), tiny_scenario)
    t0, t1 = tiny_scenario.tasks[:2]
    method.begin_task(t0)
    method.train_task(t0, [])
    method.end_task(t0)
    stale_trainer = method.trainer
    method.begin_task(t1)
    grown = method.generator
    assert grown is not stale_trainer.generator
    # The trap, demonstrated: the old trainer's function never touches the new kernel.
    before = grown.masked_convs[0].kernel.numpy().copy()
    stale_trainer.fit(method.train_dataset(t0, 0), epochs=1, verbose=0, shuffle=False)
    np.testing.assert_array_equal(grown.masked_convs[0].kernel.numpy(), before)
    # The method's own path trains the grown variables, new channels included.
    method.train_task(t1, [])
    after = grown.masked_convs[0].kernel.numpy()
    old_out = stale_trainer.generator.masked_convs[0].filters
    assert np.any(after[:, :, old_out:, :] != before[:, :, old_out:, :])


def _first_task_accuracy(scenario, **overrides):
    method = DGMw(_tiny_config(**overrides), scenario)
    for task in scenario.tasks:
        method.begin_task(task)
        method.train_task(task, [])
        method.end_task(task)
    t0 = scenario.tasks[0]
    return float(np.mean(np.argmax(method.classifier_logits(t0.x_test), 1) == t0.y_test))


def test_replay_keeps_the_first_task_and_no_replay_forgets_it(tiny_scenario):
    # 80 iterations per task and ngf 8: with seeds 0-5 task 0 kept 0.80-0.99 (ngf 4 and
    # 50 iterations was a coin toss: the tiny GAN's trousers often did not look real).
    settings = dict(epochs=40, batch_size=32, ndf=8, ngf=8)
    with_replay = _first_task_accuracy(tiny_scenario, **settings)
    # Without replay the classifier only ever sees the newest class, so forgetting needs
    # no long run: 10 epochs (20 iterations per task) halve the test's time.
    without = _first_task_accuracy(tiny_scenario, replay=False, **dict(settings, epochs=10))
    # Chance is 1/3 over three classes.
    assert with_replay > 0.6, with_replay
    assert without < 0.1, without


def test_dgma_masks_are_per_channel_and_growth_adds_the_newly_reserved_channels(tiny_scenario):
    method = DGMa(_tiny_config(ngf=5, smax=1e5, lambda_mask=0.01), tiny_scenario)
    t0, t1 = tiny_scenario.tasks[:2]
    method.begin_task(t0)
    widths = method.generator.widths
    assert widths == (20, 10, 5)
    method.train_task(t0, [])
    assert [m.shape for m in method.mask_values().values()] == [(20,), (10,), (5,)]
    method.end_task(t0)
    newly = method.history[-1]["newly_reserved"]
    assert newly == [int(r.sum()) for r in method.reserved]
    assert method.pending_growth == tuple(newly)  # approaches/DGMa.py extand_layers
    method.begin_task(t1)
    assert method.generator.widths == tuple(w + n for w, n in zip(widths, newly))
    assert [r.shape for r in method.reserved] == [(w,) for w in method.generator.widths]
    # The trainer freezes weights between reserved channels only.
    grad_masks = method.trainer.kernel_grad_masks
    for layer in range(3):
        np.testing.assert_array_equal(grad_masks[layer].numpy() == 0, _reserved_weights(method, layer))


def test_dgma_run_holds_s_fixed_within_each_epoch(tiny_scenario):
    """The wiring, not only s_schedule: every batch of a DGMa epoch trains at s_ep."""
    cfg = _tiny_config(epochs=3, smax=1e5)
    method = DGMa(cfg, tiny_scenario)
    t0 = tiny_scenario.tasks[0]
    seen = []

    class RecordS(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            seen.append((self.epoch, float(logs["s_step"])))

    method.begin_task(t0)
    method.train_task(t0, [RecordS()])
    assert len(seen) == 3 * 2  # 64 images, batch 32
    for epoch, s in seen:
        s_ep = (1e5 - 1e-5) * epoch / 3 + 1e-5
        assert s == pytest.approx(s_ep, rel=1e-6), (epoch, s)


def test_several_classes_per_task_without_aux_g_warns(embedded_raw, caplog):
    from dgm_tf.data import make_scenario

    scenario = make_scenario(
        embedded_raw, class_order=(1, 7, 8, 9), classes_per_task=2, num_tasks=None,
        train_examples_per_class=8, validation_fraction=0.15, seed=0,
    )
    with caplog.at_level("WARNING"):
        DGMa(_tiny_config(class_order=(1, 7, 8, 9), classes_per_task=2), scenario)
    assert any("--aux_g" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        DGMw(_tiny_config(class_order=(1, 7, 8, 9), classes_per_task=2, aux_g=True), scenario)
    assert not any("--aux_g" in r.getMessage() for r in caplog.records)
