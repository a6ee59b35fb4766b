"""The compiled DGM iteration equals a plain, eager, step-by-step one (fp32).

The plain path below is written for clarity, not speed: every update spelled out, Adam
by hand, masking and HAT compensation by their formulas. It draws the same random
numbers in the same order as ``DGMTaskTrainer.train_step``. Any speed work on the
training step must keep this test green.
"""

import math

import numpy as np
import tensorflow as tf

from dgm_tf.config import Config
from dgm_tf.methods.dgm import DGMw


class PlainAdam:
    """Adam as Keras defines it (bias correction folded into the step size), starting
    from ``state`` = (steps taken, {id(variable): (m, v)})."""

    def __init__(self, lr, beta1, beta2, epsilon, state):
        self.lr, self.b1, self.b2, self.eps = lr, beta1, beta2, epsilon
        self.step = state[0]
        self.m = {key: tf.constant(m) for key, (m, _) in state[1].items()}
        self.v = {key: tf.constant(v) for key, (_, v) in state[1].items()}

    def apply(self, grads, variables):
        self.step += 1
        alpha = self.lr * math.sqrt(1 - self.b2**self.step) / (1 - self.b1**self.step)
        for g, var in zip(grads, variables):
            key = id(var)
            m = self.m.get(key, tf.zeros_like(var))
            v = self.v.get(key, tf.zeros_like(var))
            m = m + (g - m) * (1 - self.b1)
            v = v + (tf.square(g) - v) * (1 - self.b2)
            self.m[key], self.v[key] = m, v
            var.assign(var - m * alpha / (tf.sqrt(v) + self.eps))


def adam_state(optimizer, variables):
    """A Keras Adam's step count and slots, as PlainAdam takes them."""
    slots = {}
    for v in variables:
        i = optimizer._get_variable_index(v)
        slots[id(v)] = (optimizer._momentums[i].numpy().copy(), optimizer._velocities[i].numpy().copy())
    return int(optimizer.iterations.numpy()), slots


def plain_iteration(method, batch, rng, s, s_epoch, d_state, g_state):
    cfg = method.config
    tr = method.trainer
    G, D, t = method.generator, method.discriminator, tr.task
    d_adam = PlainAdam(cfg.lr_d, cfg.beta1, cfg.beta2, 1e-8, d_state)
    g_adam = PlainAdam(cfg.lr_g, cfg.beta1, cfg.beta2, 1e-8, g_state)
    d_vars = D.trainable_variables
    x, y = batch["x"], batch["y"]
    b = x.shape[0]

    def all_d_grads(tape, loss):
        return [tf.zeros_like(v) if g is None else g for g, v in zip(tape.gradient(loss, d_vars), d_vars)]

    def noise(labels):
        z = rng.normal([len(labels), G.nz])
        return tf.concat([tf.one_hot(labels, G.num_code_classes), z[:, G.num_code_classes :]], axis=1)

    # 1. replay-classifier: real + one slice per past task, shuffled, t+1 chunks.
    all_x = tf.concat([x] + [r[:b] for r in batch["replay_x"]], 0)
    all_y = tf.concat([y] + [r[:b] for r in batch["replay_y"]], 0)
    order = tf.argsort(rng.uniform([all_x.shape[0]]))
    all_x, all_y = tf.gather(all_x, order), tf.gather(all_y, order)
    for k in range(t + 1):
        cx, cy = all_x[k * b : (k + 1) * b], all_y[k * b : (k + 1) * b]
        with tf.GradientTape() as tape:
            logits = D(cx, training=True)[1]
            log_p = tf.nn.log_softmax(logits)
            loss = -tf.reduce_mean(tf.gather(log_p, cy, batch_dims=1))
        d_adam.apply(all_d_grads(tape, loss), d_vars)

    # 2. critic, WGAN-GP with uniform per-sample interpolation.
    fake = G(noise(y), y, task=t, s=s, training=True)
    with tf.GradientTape() as tape:
        d_real = D(x, training=True)[0]
        d_fake = D(fake, training=True)[0]
        alpha = rng.uniform([b, 1, 1, 1])
        x_hat = alpha * x + (1 - alpha) * fake
        with tf.GradientTape() as inner:
            inner.watch(x_hat)
            critic_hat = D(x_hat, training=True)[0]
        g_hat = inner.gradient(critic_hat, x_hat)
        norms = tf.sqrt(tf.reduce_sum(g_hat**2, axis=[1, 2, 3]) + 1e-12)
        gp = cfg.lambda_gp * tf.reduce_mean((norms - 1) ** 2)
        loss = tf.reduce_mean(d_fake) - tf.reduce_mean(d_real) + gp
    d_adam.apply(all_d_grads(tape, loss), d_vars)

    # 3. generator with the mask regulariser; reserved grads zeroed, HAT, clip, Adam.
    g_vars = G.task_trainable_variables(t)
    z = noise(y)
    with tf.GradientTape() as tape:
        fake = G(z, y, task=t, s=s, training=True)
        d_out = D(fake, training=True)[0]
        masks = [tf.sigmoid(s * conv.task_embeddings[t]) for conv in G.masked_convs]
        free = [1.0 - r for r in method.reserved]
        reg = sum(tf.reduce_sum(m * f) for m, f in zip(masks, free)) / sum(tf.reduce_sum(f) for f in free)
        lam = cfg.lambda_mask * sum(G.widths) / sum(method.initial_widths)
        loss = -tf.reduce_mean(d_out) + lam * reg
    grads = dict(zip([id(v) for v in g_vars], tape.gradient(loss, g_vars)))
    for layer, conv in enumerate(G.masked_convs):
        grads[id(conv.kernel)] = grads[id(conv.kernel)] * (1.0 - method.reserved[layer])
        e = conv.task_embeddings[t]
        factor = (s_epoch / s) * (tf.cosh(tf.clip_by_value(s * e, -50, 50)) + 1) / (tf.cosh(e) + 1)
        grads[id(e)] = grads[id(e)] * factor
    ordered = [grads[id(v)] for v in g_vars]
    norm = tf.sqrt(sum(tf.reduce_sum(g**2) for g in ordered))
    scale = tf.minimum(1.0, cfg.clip_norm / norm)
    g_adam.apply([g * scale for g in ordered], g_vars)


def _state(method):
    variables = method.generator.weights + method.discriminator.weights
    return variables, [v.numpy().copy() for v in variables]


def test_compiled_iteration_equals_the_plain_one(tiny_scenario):
    cfg = Config(dataset="embedded", class_order=(1, 7, 8), epochs=1, train_examples_per_class=64,
                 batch_size=32, nz=16, ngf=4, ndf=8)
    method = DGMw(cfg, tiny_scenario)
    for task in tiny_scenario.tasks[:2]:  # train two tasks so reserved weights exist
        method.begin_task(task)
        method.train_task(task, [])
        method.end_task(task)
    task = tiny_scenario.tasks[2]
    method.begin_task(task)
    tr = method.trainer
    batch = next(iter(method.train_dataset(task, 0)))
    s, s_epoch = 37.0, 500.0
    tr.s.assign(s)
    tr.s_epoch.assign(s_epoch)
    step = tf.function(tr.train_step)
    # One iteration first, so that Adam's moments are warm: on a first step Adam moves
    # every weight by +-lr whatever the gradient's size, and where a gradient is ~0
    # float reordering (graph vs eager, oneDNN's fused kernels) flips that sign.
    step(next(iter(method.train_dataset(task, 1))))
    variables, start = _state(method)
    d_state = adam_state(tr.d_optimizer, method.discriminator.trainable_variables)
    g_state = adam_state(tr.g_optimizer, tr.g_variables)
    rng_state = tr.rng.state.numpy().copy()

    step(batch)
    fast = [v.numpy().copy() for v in variables]

    for v, value in zip(variables, start):
        v.assign(value)
    rng = tf.random.Generator.from_state(rng_state, tr.rng.algorithm)
    plain_iteration(method, batch, rng, tf.constant(s), tf.constant(s_epoch), d_state, g_state)
    plain = [v.numpy() for v in variables]

    changed = 0
    for v, a, b, before in zip(variables, fast, plain, start):
        # Adam divides by sqrt(v): where a gradient is near Adam's epsilon, float
        # reordering between graph and eager moves a weight by up to ~3e-5; a semantic
        # slip moves weights by the step size (~1e-3).
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5, err_msg=v.path)
        changed += int(np.any(a != before))
    assert changed > 20  # the iteration really updated both networks
    # Reserved generator weights are bit-identical on both paths.
    for layer, conv in enumerate(method.generator.masked_convs):
        keep = method.reserved[layer] > 0
        i = [id(v) for v in variables].index(id(conv.kernel))
        np.testing.assert_array_equal(fast[i][keep], start[i][keep])
        np.testing.assert_array_equal(plain[i][keep], start[i][keep])
