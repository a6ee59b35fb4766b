"""Dynamos's pieces: the reservoir buffer, the policy and prototype losses, the gating
agent and the gated ResNet (dgm_tf.methods.dynamos_core, dgm_tf.layers.gating,
dgm_tf.models.dynamos_net).

Reference: arXiv 2301.00620, github NeurAI-Lab/DynamicContinualLearning.
"""

import io
import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.layers.gating import GatingAgent
from dgm_tf.methods import dynamos_core as dc
from dgm_tf.models.dynamos_net import DynamosBlock, DynamosResNet

T = dc.TEMPERATURE
LN3 = math.log(3.0)


def _stream(n, ids_from=0):
    """n always-correct samples: example = its stream id, label 0, logits favour 0."""
    ids = np.arange(ids_from, ids_from + n, dtype=np.float32)[:, None]
    return ids, np.zeros(n, np.int64), np.tile([[1.0, 0.0]], (n, 1)).astype(np.float32), np.zeros((n, 3), np.float32)


def _memory(size, example_shape=(1,), classes=2, policy=3):
    """A memory and its add / sample traced once per input signature (the statistical
    tests offer thousands of batches)."""
    memory = dc.ReservoirMemory(size, example_shape, classes, policy)
    add = tf.function(lambda x, y, logits, p, seed: memory.add(x, y, logits, p, seed))
    sample = tf.function(lambda seed: memory.sample(min(size, 10), seed))
    return memory, add, sample


def _seed(*keys):
    return dc.step_seed(keys[0], keys[1] if len(keys) > 1 else 0, keys[2] if len(keys) > 2 else 0, 0)


def _stream_runs(memory, batches, key, runs):
    """For each run r: an empty memory offered ``batches`` in order with seeds
    ``_seed(key, r, i)``; yields (stored stream ids, count, seen). One traced call per
    run: the statistical tests need thousands of them."""

    @tf.function
    def one(run):
        for v in memory.variables.values():
            v.assign(tf.zeros_like(v))
        for i, batch in enumerate(batches):
            memory.add(*batch, _seed(key, run, i))
        return memory.examples[:, 0], memory.filled, memory.count(), memory.seen.read_value()

    for run in range(runs):
        ids, filled, count, seen = one(tf.constant(run, tf.int64))
        yield {int(v) for v in ids.numpy()[filled.numpy()]}, int(count), int(seen)


# ------------------------------------------------------------------ reservoir

def test_reservoir_keeps_every_subset_equally_likely():
    # Size 2, stream of 4: a uniform reservoir holds each of the C(4, 2) = 6 pairs with
    # probability 1/6. 3000 runs, expected 500 per pair; Pearson's statistic has 5
    # degrees of freedom and P(chi2_5 > 36) = 9.5e-7 (closed form for odd dof:
    # erfc(sqrt(x/2)) + sqrt(2x/pi) e^(-x/2) (1 + x/3)), so a correct reservoir fails
    # this bound for about one seed in a million. Drawing j from 0..s-1 instead of
    # 0..s (an off-by-one) always evicts for item 2: statistic in the thousands.
    runs = 3000
    counts = {pair: 0 for pair in itertools.combinations(range(4), 2)}
    memory, _, _ = _memory(2)
    batches = [tuple(tf.constant(a) for a in _stream(n, start)) for start, n in ((0, 1), (1, 2), (3, 1))]
    for stored, count, seen in _stream_runs(memory, batches, 11, runs):  # batches of 1, 2, 1 items
        assert count == 2 and seen == 4
        counts[tuple(sorted(stored))] += 1
    expected = runs / 6
    statistic = sum((c - expected) ** 2 / expected for c in counts.values())
    assert statistic < 36.0, counts


def test_reservoir_inclusion_frequency_is_size_over_stream_length():
    # Size 12, stream of 60 in batches of 7 (the fill phase ends inside a batch): every
    # item is kept with probability 12/60 = 0.2. Over 600 runs an item's count is
    # Binomial(600, 0.2): mean 120, sd 9.8. Bound 5.5 sd = 54: P(|Z| > 5.5) = 3.8e-8
    # per item, 2.3e-6 for any of the 60 (union bound).
    size, n, runs = 12, 60, 600
    inclusion = np.zeros(n)
    memory, _, _ = _memory(size)
    batches = [tuple(tf.constant(a) for a in _stream(min(7, n - start), start)) for start in range(0, n, 7)]
    for stored, count, _ in _stream_runs(memory, batches, 5, runs):
        assert count == size
        inclusion[sorted(stored)] += 1
    assert np.abs(inclusion - runs * size / n).max() < 5.5 * math.sqrt(runs * 0.2 * 0.8), inclusion


def test_add_if_correct_never_stores_a_misclassified_sample_and_never_overflows():
    rng = np.random.default_rng(0)
    memory = dc.ReservoirMemory(50, (4, 4, 1), num_classes=5, policy_width=8)
    wrong_with_slot = 0
    for step in range(60):
        classes = 3 if step < 30 else 5  # the head grows mid-stream
        n = 10
        logits = rng.normal(size=(n, classes)).astype(np.float32)
        labels = rng.integers(0, classes, size=n)
        x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
        policy = rng.normal(size=(n, 8)).astype(np.float32)
        seed = _seed(1, step)
        drawn = dc.reservoir_slots(memory.seen, n, memory.size, seed).numpy()
        written = memory.add(x, labels, logits, policy, seed).numpy()
        correct = np.argmax(logits, axis=1) == labels
        # A correct sample takes its drawn slot unless a later one of the batch takes it.
        later_same = [bool(((drawn[i + 1:] == drawn[i]) & correct[i + 1:]).any()) for i in range(n)]
        expected = np.where(correct & (drawn >= 0) & ~np.array(later_same), drawn, -1)
        np.testing.assert_array_equal(written, expected)
        wrong_with_slot += int(((drawn >= 0) & ~correct).sum())
        for i in np.flatnonzero(written >= 0):
            np.testing.assert_array_equal(memory.examples.numpy()[written[i]], x[i])
            np.testing.assert_array_equal(memory.policy_logits.numpy()[written[i]], policy[i])
        assert int(memory.count()) <= 50
        assert int(memory.seen.numpy()) == 10 * (step + 1)
    # Every stored row is a correctly classified sample, judged on its own logits width.
    state = memory.state()
    stored = np.flatnonzero(state["filled"])
    for slot in stored:
        width = state["widths"][slot]
        assert np.argmax(state["logits"][slot, :width]) == state["labels"][slot]
        assert not state["logits"][slot, width:].any()
    assert set(state["widths"][stored]) == {3, 5}
    assert wrong_with_slot > 20  # misclassified samples did draw slots: the filter was exercised
    batch = memory.sample(16, _seed(2))
    assert len(set(batch["slots"].numpy())) == 16 and batch["valid"].numpy().all()
    # Disabled (warm-up): nothing written, the seen count unchanged.
    before = memory.state()
    written = memory.add(x, labels, logits, policy, _seed(3), enabled=False).numpy()
    assert (written == -1).all()
    for name, value in memory.state().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_sampling_skips_slots_never_written():
    memory = dc.ReservoirMemory(8, (1,), 2, 3)
    x, labels, logits, policy = _stream(6)
    logits[[1, 4]] = [0.0, 1.0]  # two fill-phase samples misclassified: slots 1, 4 stay empty
    memory.add(x, labels, logits, policy, _seed(0))
    assert int(memory.count()) == 4 and int(memory.seen.numpy()) == 6
    for seed in range(20):
        batch = memory.sample(6, _seed(seed))
        slots, valid = batch["slots"].numpy(), batch["valid"].numpy()
        assert sorted(slots[valid]) == [0, 2, 3, 5] and valid.sum() == 4  # the filled ones first
        assert len(set(slots)) == 6


def test_buffer_state_round_trip_is_exact():
    memory = dc.ReservoirMemory(20, (3, 3, 1), 4, 4)

    def offer(buf, step, classes):
        data = np.random.default_rng(100 + step)
        logits = data.normal(size=(6, classes)).astype(np.float32)
        buf.add(data.normal(size=(6, 3, 3, 1)).astype(np.float32), data.integers(0, classes, size=6),
                logits, data.normal(size=(6, 4)).astype(np.float32), _seed(9, step))

    for step in range(12):
        offer(memory, step, 2 if step < 6 else 4)
    arrays = memory.state()
    blob = io.BytesIO()
    np.savez(blob, **arrays)
    blob.seek(0)
    restored = dc.ReservoirMemory(20, (3, 3, 1), 4, 4)
    restored.restore(dict(np.load(blob)))
    for name, value in restored.state().items():
        assert value.dtype == arrays[name].dtype
        np.testing.assert_array_equal(value, arrays[name], err_msg=name)
    # The two continue identically (same keyed draws), and sample the same batches.
    for step in range(12, 20):
        offer(memory, step, 4)
        offer(restored, step, 4)
    a, b = memory.sample(8, _seed(4)), restored.sample(8, _seed(4))
    for name in a:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
    with pytest.raises(ValueError, match="shape"):
        dc.ReservoirMemory(21, (3, 3, 1), 4, 4).restore(arrays)


def test_step_seeds_are_keyed():
    a = dc.step_seed(7, 1, 5, dc.STREAM_GATES).numpy()
    assert a.shape == (2,)
    np.testing.assert_array_equal(a, dc.step_seed(7, 1, 5, dc.STREAM_GATES).numpy())
    for other in (dc.step_seed(8, 1, 5, dc.STREAM_GATES), dc.step_seed(7, 2, 5, dc.STREAM_GATES),
                  dc.step_seed(7, 1, 6, dc.STREAM_GATES), dc.step_seed(7, 1, 5, dc.STREAM_BUFFER_ADD)):
        assert not np.array_equal(a, other.numpy())


# --------------------------------------------------------------------- losses

def test_policy_loss_on_hand_computed_values():
    # Two agents of two channels. p = sigmoid(z / T): z = T ln 3 -> 0.75, 0 -> 0.5,
    # -T ln 3 -> 0.25.
    z = np.array([[T * LN3, -T * LN3, 0.0, T * LN3],
                  [0.0, 0.0, T * LN3, -T * LN3]], np.float32)
    actions = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], np.float32)
    class_logits = np.array([[2.0, 0.0], [2.0, 0.0]], np.float32)
    labels = np.array([0, 1])  # sample 0 correct, sample 1 misclassified
    # Sample 0: agent 0 keeps 1/2 -> r = -(0.7 - 0.5)^2 = -0.04, log pi = ln .75 + ln .75;
    #           agent 1 keeps 2/2 -> r = -0.09, log pi = ln .5 + ln .75.
    # Sample 1 (x500, same sign): agent 0 keeps 0 -> r = -0.49 * 500 = -245, log pi = 2 ln .5;
    #           agent 1 keeps 1/2 -> r = -0.04 * 500 = -20, log pi = ln .25 + ln .25.
    rewards = dc.gate_rewards(class_logits, labels, actions, [2, 2])
    np.testing.assert_allclose(rewards.numpy(), [[-0.04, -0.09], [-245.0, -20.0]], rtol=1e-5)
    log_pi = dc.agent_log_probs(z, actions, [2, 2])
    want_log_pi = [[2 * math.log(0.75), math.log(0.5) + math.log(0.75)], [2 * math.log(0.5), 2 * math.log(0.25)]]
    np.testing.assert_allclose(log_pi.numpy(), want_log_pi, rtol=1e-5)
    per_sample = dc.policy_loss(class_logits, labels, actions, z, [2, 2])
    want = [(0.04 * want_log_pi[0][0] + 0.09 * want_log_pi[0][1]) / 2,
            (245.0 * want_log_pi[1][0] + 20.0 * want_log_pi[1][1]) / 2]
    np.testing.assert_allclose(per_sample.numpy(), want, rtol=1e-5)
    # Penalty -200 multiplies by 200; the mean over samples is the reference's mean over [N, agents].
    per_sample_200 = dc.policy_loss(class_logits, labels, actions, z, [2, 2], policy_penalty=-200.0)
    np.testing.assert_allclose(per_sample_200.numpy()[1], want[1] * 200 / 500, rtol=1e-5)
    matrix = -np.array(want_log_pi) * np.array([[-0.04, -0.09], [-245.0, -20.0]])
    np.testing.assert_allclose(tf.reduce_mean(per_sample).numpy(), matrix.mean(), rtol=1e-5)


def test_log_prob_is_clamped_as_torch_bernoulli_clamps_p():
    # torch.distributions.Bernoulli(probs).log_prob clamps p to [eps, 1 - eps] (eps =
    # 2^-23): log pi of a channel never falls below log(eps) = -15.94, and a gate
    # saturated past the clamp gets no gradient. Unclamped, log_sigmoid(-100 / 0.15)
    # would be -666.7 with gradient -1 / 0.15 per unit.
    z = tf.constant([[100.0, -100.0, 1.0, 0.0]])
    actions = tf.constant([[0.0, 1.0, 1.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(z)
        log_pi = dc.bernoulli_log_prob(z, actions)
        total = tf.reduce_sum(log_pi)
    grad = tape.gradient(total, z).numpy()
    eps = 2.0 ** -23
    np.testing.assert_allclose(log_pi.numpy()[0, :2], [math.log(eps)] * 2, rtol=1e-5)
    np.testing.assert_allclose(log_pi.numpy()[0, 2:], [math.log(1 / (1 + math.exp(-1 / T))), math.log(0.5)], rtol=1e-6)
    assert grad[0, 0] == 0.0 and grad[0, 1] == 0.0
    np.testing.assert_allclose(grad[0, 3], -0.5 / T, rtol=1e-6)  # d log(1 - p) / dz at p = 0.5


def test_policy_loss_gradient_reaches_logits_only_through_log_pi():
    z = tf.Variable([[0.1, -0.2, 0.3, 0.05]])
    actions = tf.constant([[1.0, 0.0, 1.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = dc.policy_loss(tf.constant([[1.0, 0.0]]), tf.constant([0]), actions, z, [4])[0]
    grad = tape.gradient(loss, z).numpy()
    # d/dz [-log pi * r] with r = -(0.7 - 0.5)^2 = -0.04 constant: 0.04 * d log pi / dz,
    # d log pi / dz = (a - p) / T.
    p = 1 / (1 + np.exp(-z.numpy() / T))
    np.testing.assert_allclose(grad, 0.04 * (actions.numpy() - p) / T, rtol=1e-5)


def test_prototype_loss_on_hand_computed_values():
    z = np.array([[0, 0], [1, 0], [0, 2], [3, 3]], np.float32)
    labels = np.array([0, 0, 1, 1])
    # Samples 0, 1, 2 selected, D = 2. Pairs: (0,1) same, d = 1; (0,2) different, d = 4;
    # (1,2) different, d = 1 + 4 = 5. (1 + 1/2) / (1 + 9/2) = 3/11.
    loss = dc.prototype_loss(z, labels, np.array([True, True, True, False]))
    assert float(loss) == pytest.approx(3 / 11, rel=1e-6)
    # All four: same pairs (0,1) 1 and (2,3) 9 + 1 = 10; different (0,2) 4, (1,2) 5,
    # (0,3) 18, (1,3) 4 + 9 = 13. (1 + 11/2) / (1 + 40/2) = 6.5 / 21.
    assert float(dc.prototype_loss(z, labels, np.ones(4, bool))) == pytest.approx(6.5 / 21, rel=1e-6)
    # At most two selected samples: no loss (the reference applies it only above 2).
    assert float(dc.prototype_loss(z, labels, np.array([True, False, True, False]))) == 0.0
    # Against the formula with expanded norms on random data.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 16)).astype(np.float32)
    labels = rng.integers(0, 3, size=9)
    sq = (z**2).sum(1)
    dist = np.triu(sq[:, None] + sq[None, :] - 2 * z @ z.T, k=1)
    same = labels[:, None] == labels[None, :]
    want = (1 + (dist * same).sum() / 16) / (1 + (dist * ~same).sum() / 16)
    assert float(dc.prototype_loss(z, labels, np.ones(9, bool))) == pytest.approx(want, rel=1e-4)


def test_logit_replay_mse_uses_each_rows_width():
    outputs = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], np.float32)
    stored = np.array([[0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
    # Row 0 stored with 2 classes: ((1-0)^2 + 0) / 2; row 1 with 3: (1 + 1 + 9) / 3.
    np.testing.assert_allclose(dc.logit_replay_mse(outputs, stored, [2, 3]).numpy(), [0.5, 11 / 3], rtol=1e-6)
    np.testing.assert_allclose(dc.logit_replay_mse(outputs, stored).numpy(), [10 / 3, 11 / 3], rtol=1e-6)


def test_warmup_rule_and_best_settings():
    # One epoch per task: the first 10 steps of the run; more: the first 10 epochs of the run.
    assert dc.ungated_warmup(0, 0, 9, 1) and not dc.ungated_warmup(0, 0, 10, 1)
    assert not dc.ungated_warmup(1, 0, 0, 1)
    assert dc.ungated_warmup(0, 9, 500, 70) and not dc.ungated_warmup(0, 10, 0, 70)
    assert dc.ungated_warmup(1, 1, 0, 5) and not dc.ungated_warmup(2, 0, 0, 5)
    best = dc.BEST_SETTINGS["seq_mnist_b500"]
    assert (best.lr, best.batch_size, best.buffer_batch_size, best.epochs) == (0.07, 10, 10, 1)
    assert (best.alpha, best.beta, best.policy_alpha, best.policy_penalty) == (0.2, 2.0, 0.2, -500.0)
    assert (best.reward_weight, best.prototype_weight, best.keep_ratio, best.nf) == (0.5, 0.3, 0.7, 32)
    svhn = dc.BEST_SETTINGS["seq_svhn_b500"]
    assert (svhn.epochs, svhn.batch_size, svhn.alpha, svhn.beta, svhn.policy_alpha) == (70, 16, 2.0, 3.0, 1.0)
    assert {s.buffer_size for s in dc.BEST_SETTINGS.values()} == {500, 1000, 2000}


# ------------------------------------------------------------- agent and network

def test_agent_samples_from_its_noise_and_thresholds_at_inference():
    agent = GatingAgent(16, name="agent")
    x = tf.random.stateless_normal((8, 5, 5, 6), seed=(1, 2))
    actions, p, logits = agent(x, training=True, seed=tf.constant([3, 4]))
    np.testing.assert_allclose(p.numpy(), 1 / (1 + np.exp(-logits.numpy() / T)), rtol=1e-5)
    noise = tf.random.stateless_uniform((8, 16), seed=[3, 4])
    np.testing.assert_array_equal(actions.numpy(), (noise.numpy() < p.numpy()).astype(np.float32))
    again, _, _ = agent(x, training=True, seed=tf.constant([3, 4]))
    np.testing.assert_array_equal(again.numpy(), actions.numpy())
    other, _, _ = agent(x, training=True, seed=tf.constant([3, 5]))
    assert (other.numpy() != actions.numpy()).any()
    # Inference: p >= 0.5, the same on every call whatever seed is passed.
    keep, p_inf, _ = agent(x)
    np.testing.assert_array_equal(keep.numpy(), (p_inf.numpy() >= 0.5).astype(np.float32))
    np.testing.assert_array_equal(agent(x, seed=tf.constant([9, 9]))[0].numpy(), keep.numpy())
    assert 0 < keep.numpy().mean() < 1
    with pytest.raises(ValueError):
        agent(x, training=True)


def test_layers_and_network_get_config_round_trip():
    x = tf.random.stateless_normal((2, 8, 8, 1), seed=(0, 1))
    for layer in (GatingAgent(32, hidden_ratio=8, temperature=0.2, name="a"),
                  DynamosBlock(16, stride=2, gated=True, name="b"),
                  DynamosResNet(3, image_channels=1, image_size=8, nf=8, name="net")):
        config = keras.saving.serialize_keras_object(layer)
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
    net = DynamosResNet(3, image_channels=1, image_size=8, nf=8, name="net")
    clone = DynamosResNet.from_config(net.get_config())
    clone.set_weights(net.get_weights())
    np.testing.assert_array_equal(clone.classify(x).numpy(), net.classify(x).numpy())


def test_network_shapes_ungated_stage_one_and_gates_as_multipliers():
    net = DynamosResNet(2, image_channels=1, image_size=16, name="net")
    # Hand count of trainable parameters (PyTorch's count of the reference network):
    # stem 3*32*9 + BN 64 = 928; stage 1: 4 convs 32*32*9 + 4 BN 64 = 37120;
    # agent(C_in): C_in*64 + BN 128 + (64*4 + 4) + (4*64 + 64) = 64 C_in + 708;
    # block 3: 32*64*9 + 64*64*9 + 2 BN 128 + shortcut 32*64 + BN 128 + agents(32), (64) = 65288;
    # block 4: 2*64*64*9 + 256 + 2 agents(64) = 83592; head 64*2 + 2 = 130. Total 187058.
    assert sum(int(np.prod(v.shape)) for v in net.trainable_weights) == 187058
    assert net.agent_channels == [64] * 4 and net.gate_width == 256
    assert [bool(b.agents) for b in net.blocks] == [False, False, True, True]
    assert tuple(net.stem_conv.kernel.shape) == (3, 3, 3, 32)  # grayscale repeated to 3 channels
    x = tf.random.stateless_normal((4, 16, 16, 1), seed=(5, 6))
    out = net(x, training=True, seed=tf.constant([1, 2]))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "logits": (4, 2), "policy_logits": (4, 256), "probabilities": (4, 256), "actions": (4, 256)}
    assert set(net(x, training=True, gated=False)) == {"logits"}
    # Noise 0 keeps every channel (0 < p): the gated pass is the ungated one exactly.
    ungated = net(x, training=True, gated=False)["logits"].numpy()
    all_kept = net(x, training=True, gate_noise=tf.zeros((4, 256)))
    assert all_kept["actions"].numpy().all()
    np.testing.assert_allclose(all_kept["logits"].numpy(), ungated, rtol=1e-5, atol=1e-6)
    # Noise 1 drops every channel: stage 2's output is 0 (the second gate multiplies the
    # shortcut too), so the logits are the head's bias.
    none_kept = net(x, training=True, gate_noise=tf.ones((4, 256)))
    assert not none_kept["actions"].numpy().any()
    np.testing.assert_allclose(none_kept["logits"].numpy(), np.tile(net.head.bias.numpy(), (4, 1)), atol=1e-6)
    # The seed path draws gate_noise(seed, N).
    with_seed = net(x, training=True, seed=tf.constant([1, 2]))
    with_noise = net(x, training=True, gate_noise=net.gate_noise(tf.constant([1, 2]), 4))
    np.testing.assert_array_equal(with_seed["actions"].numpy(), with_noise["actions"].numpy())
    with pytest.raises(ValueError):
        net(x, training=True)


def test_inference_gates_are_deterministic_and_wider_head_keeps_old_logits():
    net = DynamosResNet(2, image_channels=3, image_size=16, name="net")
    x = tf.random.stateless_normal((6, 16, 16, 3), seed=(7, 8))
    first, second = net(x, training=False), net(x, training=False)
    np.testing.assert_array_equal(first["actions"].numpy(), second["actions"].numpy())
    np.testing.assert_array_equal(first["actions"].numpy(), (first["probabilities"].numpy() >= 0.5))
    np.testing.assert_array_equal(net.classify(x).numpy(), first["logits"].numpy())
    wider = net.with_classes(5)
    out = wider(x, training=False)
    assert out["logits"].shape == (6, 5)
    np.testing.assert_allclose(out["logits"].numpy()[:, :2], first["logits"].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["actions"].numpy(), first["actions"].numpy())


def test_keep_fraction_moves_toward_keep_ratio_under_the_policy_loss():
    # Agents trained on the policy loss alone, the reference's SGD lr 0.07, every sample
    # misclassified (so the reward is -500 (0.7 - kept)^2). In training mode the agents'
    # BN centres the pooled features, so the keep fraction starts at 0.5. Measured over
    # seeds 0-3 (oneDNN on and off): the first 3 steps keep 0.51-0.52 of the channels, the
    # last 5 of 40 steps 0.687-0.697.
    keras.utils.set_random_seed(0)
    net = DynamosResNet(2, image_channels=1, image_size=16, name="net")
    x = tf.random.stateless_normal((16, 16, 16, 1), seed=(0, 1))
    optimizer = keras.optimizers.SGD(0.07)
    variables = [v for agent in net.agents for v in agent.trainable_variables]

    @tf.function
    def step(s):
        with tf.GradientTape() as tape:
            out = net(x, training=True, seed=tf.stack([tf.constant(0, tf.int64), s]))
            wrong = (tf.argmax(out["logits"], axis=1) + 1) % 2
            loss = tf.reduce_mean(dc.policy_loss(out["logits"], wrong, out["actions"], out["policy_logits"],
                                                 net.agent_channels))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return tf.reduce_mean(out["actions"])

    kept = np.array([float(step(tf.constant(s, tf.int64))) for s in range(40)])
    assert abs(kept[:3].mean() - 0.5) < 0.05
    assert abs(kept[-5:].mean() - 0.7) < 0.05
