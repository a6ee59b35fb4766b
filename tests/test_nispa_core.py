"""NISPA's pure pieces (dgm_tf.methods.nispa_core), its masked layers and networks.

Hand-computed toy networks for the selection, the drop and the stop rule; a property
test over random toy networks for drop/regrow (density, no plastic->stable link,
stable->stable untouched). Reference: arXiv 2206.09117, github BurakGurbuz97/NISPA.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.layers.sparse_masked import SparseMaskedConv2D, SparseMaskedDense, mask_frozen_gradients
from dgm_tf.methods import nispa_core as nc
from dgm_tf.models.nispa_nets import NispaConvNet, NispaMLP, build_nispa_network


def _b(*rows):
    return np.array(rows, bool)


# ------------------------------------------------------------------------- masks

@pytest.mark.parametrize("shape,density", [((7, 5), 0.2), ((3, 64), 0.1), ((10, 10), 0.25), ((1, 3), 0.5)])
def test_random_connectivity_has_exact_count(shape, density):
    size = shape[0] * shape[1]
    for seed in range(3):
        mask = nc.random_connectivity(shape, density, np.random.default_rng(seed))
        assert mask.shape == shape and mask.dtype == bool
        assert mask.sum() == math.floor(density * size + 0.5)
    same = nc.random_connectivity(shape, density, np.random.default_rng(7))
    np.testing.assert_array_equal(same, nc.random_connectivity(shape, density, np.random.default_rng(7)))


def test_exact_count_rounds_half_up_and_rejects_bad_density():
    assert nc.exact_count(0.25, 10) == 3  # 2.5 -> 3
    assert nc.exact_count(0.2, 12) == 2  # 2.4 -> 2
    with pytest.raises(ValueError):
        nc.exact_count(0.0, 10)


# -------------------------------------------------------------------- p schedule

def test_p_schedule_values_and_five_percent_phase():
    assert nc.p_schedule(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 30)), abs=1e-15)
    assert nc.p_schedule(15) == pytest.approx(0.5, abs=1e-15)
    assert nc.p_schedule(30) == pytest.approx(0.0, abs=1e-15)
    assert nc.p_schedule(10, k=20) == pytest.approx(0.5, abs=1e-15)
    # p <= 5 % first at phase 26: 0.5 (1 + cos(26 pi / 30)) = 0.0432, phase 25: 0.0670.
    assert nc.p_schedule(25) > 0.05 >= nc.p_schedule(26)
    with pytest.raises(ValueError):
        nc.p_schedule(0)


# ------------------------------------------------------------------ stable units

def test_select_top_units_includes_the_unit_that_reaches_p():
    # total 10, p = 0.5: unit 0 alone carries 5 >= 5 (boundary reached exactly).
    np.testing.assert_array_equal(nc.select_top_units([5.0, 3.0, 2.0], 0.5), [True, False, False])
    # total 10, p = 0.7: 5 < 7, 5 + 3 = 8 >= 7.
    np.testing.assert_array_equal(nc.select_top_units([5.0, 3.0, 2.0], 0.7), [True, True, False])
    # ties: the lower index first (4 >= 4 after unit 1 alone).
    np.testing.assert_array_equal(nc.select_top_units([1.0, 4.0, 4.0, 1.0], 0.4), [False, True, False, False])
    np.testing.assert_array_equal(nc.select_top_units([1.0, 4.0, 4.0, 1.0], 0.5), [False, True, True, False])
    # p = 1 needs every active unit (and the first zero one only if the sum is reached earlier).
    np.testing.assert_array_equal(nc.select_top_units([0.0, 2.0, 1.0], 1.0), [False, True, True])
    np.testing.assert_array_equal(nc.select_top_units([0.0, 0.0, 0.0], 0.9), [True, False, False])


def test_unit_activation_sums_over_batch_and_space():
    conv = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(nc.unit_activation_sums(conv), conv.sum(axis=(0, 1, 2)))
    dense = np.array([[1.0, 0.0], [2.0, 3.0]])
    np.testing.assert_allclose(nc.unit_activation_sums(dense), [3.0, 3.0])


# Toy network: 3 inputs -> h1 (4) -> h2 (3) -> 2 logits.
TOY_MASKS = [
    _b([1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0]),  # h1 unit 3 has no input at all
    _b([0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 0, 0]),
    _b([1, 1], [1, 0], [0, 1]),
]
TOY_ACTIVATIONS = [np.array([1.0, 2.0, 1.0, 6.0]), np.array([5.0, 3.0, 2.0])]
TOY_PREVIOUS = [np.ones(3, bool), _b(1, 0, 0, 0), _b(0, 0, 1), _b(1, 0)]


def test_select_stable_units_on_hand_computed_toy_network():
    # p = 0.7. h1: total 10, 6 (unit 3) + 2 (unit 1) = 8 >= 7 -> {1, 3}; unit 3 has no
    # input from a stable unit -> demoted; with the earlier task's {0}: {0, 1}.
    # h2: total 10, 5 + 3 = 8 >= 7 -> {0, 1}; unit 0 reads only h1 unit 3 (plastic now),
    # unit 1 only h1 unit 2 (plastic) -> both demoted; with the earlier {2}: {2}.
    # logits: classes so far {1} with the earlier {0}.
    stable = nc.select_stable_units(TOY_ACTIVATIONS, 0.7, TOY_PREVIOUS, _b(0, 1), TOY_MASKS)
    expected = [np.ones(3, bool), _b(1, 1, 0, 0), _b(0, 0, 1), _b(1, 1)]
    for got, want in zip(stable, expected):
        np.testing.assert_array_equal(got, want)
    # The reference's effective rule (its demotion result is discarded): no demotion.
    reference = nc.select_stable_units(TOY_ACTIVATIONS, 0.7, TOY_PREVIOUS, _b(0, 1), TOY_MASKS,
                                       demote_unsupported=False)
    for got, want in zip(reference, [np.ones(3, bool), _b(1, 1, 0, 1), _b(1, 1, 1), _b(1, 1)]):
        np.testing.assert_array_equal(got, want)
    # First task (no earlier stable units): h1 {1}, h2 {} (unit 2 is not in the top set).
    first = nc.select_stable_units(TOY_ACTIVATIONS, 0.7, None, _b(1, 0), TOY_MASKS)
    for got, want in zip(first, [np.ones(3, bool), _b(0, 1, 0, 0), _b(0, 0, 0), _b(1, 0)]):
        np.testing.assert_array_equal(got, want)


def test_demotion_uses_a_flattened_layers_sources():
    # Two channels feed a dense layer through 4 flattened rows: row r <- channel r % 2.
    masks = [np.ones((1, 2), bool), _b([0, 0], [1, 0], [0, 0], [0, 1]), np.ones((2, 1), bool)]
    sources = [None, np.arange(4) % 2, None]
    # Channel 0 stable, channel 1 plastic (activations 9, 1; p = 0.5). Dense unit 0 reads
    # row 1 (channel 1, plastic) -> demoted; unit 1 reads row 3 (channel 1) -> demoted.
    stable = nc.select_stable_units([np.array([9.0, 1.0]), np.array([1.0, 1.0])], 0.5, None, _b(1),
                                    masks, sources)
    np.testing.assert_array_equal(stable[1], [True, False])
    np.testing.assert_array_equal(stable[2], [False, False])
    masks[1][2, 0] = True  # row 2 <- channel 0 (stable): dense unit 0 is now supported
    stable = nc.select_stable_units([np.array([9.0, 1.0]), np.array([1.0, 1.0])], 0.5, None, _b(1),
                                    masks, sources)
    np.testing.assert_array_equal(stable[2], [True, False])


# ----------------------------------------------------------------- drop / regrow

TOY_STABLE = [np.ones(3, bool), _b(1, 1, 0, 0), _b(0, 0, 1), _b(1, 1)]


def test_drop_removes_exactly_plastic_to_stable_connections():
    masks, dropped = nc.drop_connections(TOY_MASKS, TOY_STABLE)
    # Layer 0: inputs all stable -> nothing. Layer 1: into h2 unit 2 (stable) from h1
    # units 2, 3 (plastic): none exist (row 0 -> 2 comes from stable unit 0). Layer 2:
    # into both logits (stable) from h2 units 0, 1 (plastic): (0,0), (0,1), (1,0).
    assert dropped == [0, 0, 3]
    np.testing.assert_array_equal(masks[0], TOY_MASKS[0])
    np.testing.assert_array_equal(masks[1], TOY_MASKS[1])
    np.testing.assert_array_equal(masks[2], _b([0, 0], [0, 0], [0, 1]))


def test_orphan_gets_one_link_to_a_plastic_unit_within_the_budget():
    # h1 (3 units; 0 stable) -> h2 (4 units; 0, 1 stable). h1 unit 1 has no outgoing
    # connection, unit 2 has one.
    masks = [np.ones((2, 3), bool), _b([1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]), np.ones((4, 1), bool)]
    stable = [np.ones(2, bool), _b(1, 0, 0), _b(1, 1, 0, 0), _b(1)]
    for seed in range(5):
        new, added, budget = nc.connect_orphans(masks, stable, [0, 2, 0], np.random.default_rng(seed))
        assert added[1].sum() == 1 and budget == [0, 1, 0]
        row, target = np.argwhere(added[1])[0]
        assert row == 1 and target in (2, 3)  # from the orphan, into a plastic unit
        assert new[1][row, target] and new[1].sum() == masks[1].sum() + 1
    # No budget in that layer (nothing was dropped there): no link (the reference's rule).
    _, added, _ = nc.connect_orphans(masks, stable, [5, 0, 5], np.random.default_rng(0))
    assert sum(a.sum() for a in added) == 0
    # No plastic unit in the next layer: nowhere to link to.
    all_stable = [stable[0], stable[1], np.ones(4, bool), stable[3]]
    _, added, budget = nc.connect_orphans(masks, all_stable, [0, 2, 0], np.random.default_rng(0))
    assert added[1].sum() == 0 and budget == [0, 2, 0]


def test_regrow_targets_only_plastic_units_and_returns_the_remainder():
    mask = np.zeros((4, 5), bool)
    mask[0, 0] = True
    stable = [np.ones(4, bool), _b(1, 1, 0, 0, 0)]  # targets 2, 3, 4 plastic: 12 candidates
    for seed in range(5):
        new, grown, remainder = nc.regrow_connections([mask], stable, [7], np.random.default_rng(seed))
        assert grown[0].sum() == 7 and remainder == [0]
        assert not grown[0][:, :2].any()
        assert new[0].sum() == 8
    new, grown, remainder = nc.regrow_connections([mask], stable, [15], np.random.default_rng(0))
    assert grown[0].sum() == 12 and remainder == [3] and new[0][:, 2:].all()


def _random_toy_network(rng):
    """3-6 sparse layers, random widths, densities and stable sets; one flattened layer."""
    depth = int(rng.integers(3, 6))
    widths = [int(w) for w in rng.integers(2, 12, size=depth + 1)]
    flat_layer = int(rng.integers(1, depth))  # this layer reads 3 rows per source unit
    masks, sources, kernels = [], [], []
    for l in range(depth):
        rows = widths[l] * 3 if l == flat_layer else widths[l]
        density = float(rng.uniform(0.15, 0.6))
        masks.append(nc.random_connectivity((rows, widths[l + 1]), density, rng))
        sources.append(np.arange(rows) % widths[l] if l == flat_layer else None)
        shape = (3, 3, rows, widths[l + 1]) if l == 0 else (rows, widths[l + 1])
        kernels.append(nc.apply_connectivity(rng.normal(size=shape).astype(np.float32), masks[-1]))
    activations = [rng.exponential(size=w) for w in widths[1:-1]]
    previous = [np.ones(widths[0], bool)] + [rng.random(w) < 0.15 for w in widths[1:-1]] + [np.zeros(widths[-1], bool)]
    outputs = rng.random(widths[-1]) < 0.5
    stable = nc.select_stable_units(activations, float(rng.uniform(0.3, 1.0)), previous, outputs, masks, sources)
    return masks, sources, kernels, stable


def test_rewire_property_density_constant_and_no_plastic_to_stable_link():
    rng = np.random.default_rng(2022)
    exact = 0
    for _ in range(60):
        masks, sources, kernels, stable = _random_toy_network(rng)
        before = nc.connection_counts(masks)
        result = nc.rewire(kernels, masks, stable, np.random.default_rng(int(rng.integers(1 << 30))), sources)
        after = nc.connection_counts(result.masks)
        assert after == [b - r for b, r in zip(before, result.remainder)]
        for l, (old, new) in enumerate(zip(masks, result.masks)):
            rows = np.arange(old.shape[0]) if sources[l] is None else sources[l]
            src_stable = stable[l][rows][:, None]
            tgt_stable = stable[l + 1][None, :]
            assert not (new & ~src_stable & tgt_stable).any()  # no plastic -> stable
            keep = src_stable & tgt_stable
            np.testing.assert_array_equal(new & keep, old & keep)  # stable -> stable untouched
            frozen_w = nc._expand_to_kernel(old & keep, kernels[l].shape)
            np.testing.assert_array_equal(result.kernels[l][frozen_w], kernels[l][frozen_w])
            assert not (result.regrown[l] & tgt_stable).any()  # regrowth only into plastic
            absent = ~nc._expand_to_kernel(new, kernels[l].shape)
            assert not result.kernels[l][absent].any()  # absent weights are 0
            # A remainder only when every absent position into a plastic unit was filled.
            if result.remainder[l]:
                assert (new | tgt_stable).all()
        exact += all(r == 0 for r in result.remainder)
    assert exact >= 40  # most random networks have room to regrow everything


def test_rewire_links_orphans_first():
    # h1 unit 1 (plastic) loses its only outgoing link (into stable h2 unit 0): 1 dropped
    # in layer 1, so the whole budget goes to the orphan, never to the 10 other candidates.
    masks = [np.ones((2, 3), bool), _b([1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]),
             np.ones((6, 1), bool)]
    stable = [np.ones(2, bool), _b(1, 0, 0), _b(1, 0, 0, 0, 0, 0), _b(1)]
    kernels = [nc.apply_connectivity(np.full(m.shape, 0.5, np.float32), m) for m in masks]
    for seed in range(10):
        result = nc.rewire(kernels, masks, stable, np.random.default_rng(seed))
        assert result.dropped[1] == 1 and result.orphan_links[1][1].sum() == 1
        assert result.regrown[1].sum() == 0 and result.masks[1][1].any()
        row, target = np.argwhere(result.orphan_links[1])[0]
        assert result.kernels[1][row, target] == 0.0  # the orphan link starts at 0


def test_growth_statistics_use_existing_nonzero_weights_only():
    kernel = np.array([[0.0, 2.0, 9.0], [4.0, 0.0, 9.0]], np.float32)
    mask = _b([1, 1, 0], [1, 1, 0])  # 9.0 is absent; the zeros (e.g. orphan links) do not count
    assert nc.growth_weight_stats(kernel, mask) == (3.0, 1.0)
    conv = np.zeros((2, 2, 2, 1), np.float32)
    conv[..., 0, 0] = [[1.0, 3.0], [1.0, 3.0]]
    conv[..., 1, 0] = 100.0
    assert nc.growth_weight_stats(conv, _b([1], [0])) == (2.0, 1.0)
    assert nc.growth_weight_stats(np.zeros((2, 2)), np.ones((2, 2), bool)) == (0.0, 0.0)


def test_regrown_weights_follow_the_layers_nonzero_weight_statistics():
    rng = np.random.default_rng(0)
    mask = np.zeros((200, 100), bool)
    mask[:, :50] = rng.random((200, 50)) < 0.5  # existing connections into plastic units 0..49
    mask[:, 50:] = True  # every input -> stable units 50..99: all plastic inputs will drop
    kernel = nc.apply_connectivity(rng.normal(0.3, 2.0, size=mask.shape).astype(np.float32), mask)
    stable = [np.arange(200) < 100, np.arange(100) >= 50]
    result = nc.rewire([kernel], [mask], stable, np.random.default_rng(1))
    assert result.dropped == [100 * 50] and result.remainder == [0]
    linked = mask & ~nc.plastic_to_stable([mask], stable)[0]
    mean, std = nc.growth_weight_stats(kernel, linked)
    new = result.kernels[0][result.regrown[0]]
    assert new.size == 5000
    # 5000 draws: standard errors 0.03 (mean) and 0.02 (std) against std ~2.
    assert abs(new.mean() - mean) < 0.15 and abs(new.std() - std) < 0.1
    assert abs(mean - 0.3) < 0.1 and abs(std - 2.0) < 0.1


# --------------------------------------------------------------------- stop rule

def test_stop_rule_on_scripted_validation_sequences():
    # 69.25 is exactly 70 - 0.75: not "more than" a_f below -> goes on; 68 stops.
    assert nc.run_stop_rule([50, 60, 70, 69.5, 69.25, 68, 90]) == (6, 5)
    # Phase 2 may fall as far as it likes; the best stays 80.
    assert nc.run_stop_rule([80, 10, 85, 84.5, 80]) == (5, 4)
    # The best is the maximum so far, not the last value: 79 < 80 - 0.75.
    assert nc.run_stop_rule([70, 80, 79.5, 79.0]) == (4, 3)
    # Never falling: stops when p <= 5 % (phase 26) and keeps phase 25.
    assert nc.run_stop_rule(np.linspace(50, 99, 40)) == (26, 25)
    assert nc.run_stop_rule([50, 60, 70]) is None
    # The replay variant's min_phases and another a_f.
    assert nc.run_stop_rule([80, 70, 60], min_phases=1) == (2, 1)
    assert nc.run_stop_rule([80, 79, 78.5, 77.9], a_f=2.0) == (4, 3)
    assert nc.should_stop(3, 89.0, 90.0) and not nc.should_stop(3, 89.25, 90.0)


def test_phase_keeps_its_first_best_epoch():
    assert nc.phase_best_epoch([50.0, 70.0, 70.0, 60.0]) == 1
    assert nc.phase_best_epoch([0.0, 0.0]) == 0


# ---------------------------------------------------------------------- task end

def test_freeze_masks_are_stable_to_stable_and_stable_biases():
    freeze = nc.freeze_masks(TOY_STABLE, TOY_MASKS)
    np.testing.assert_array_equal(freeze[0][0], np.repeat(_b([1, 1, 0, 0]), 3, axis=0))
    np.testing.assert_array_equal(freeze[0][1], [True, True, False, False])
    np.testing.assert_array_equal(freeze[1][0], _b([0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]))
    np.testing.assert_array_equal(freeze[1][1], [False, False, True])
    np.testing.assert_array_equal(freeze[2][0], _b([0, 0], [0, 0], [1, 1]))
    np.testing.assert_array_equal(freeze[2][1], [True, True])
    sources = [None, np.arange(4) % 2, None]  # flattened: row r <- channel r % 2
    masks = [np.ones((1, 2), bool), np.ones((4, 3), bool), np.ones((3, 1), bool)]
    stable = [np.ones(1, bool), _b(0, 1), _b(1, 0, 1), _b(1)]
    flat = nc.freeze_masks(stable, masks, sources)[1][0]
    np.testing.assert_array_equal(flat, _b([0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 0, 1]))


def test_reinitialize_keeps_frozen_values_and_draws_fan_out_kaiming():
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 20, 300)).astype(np.float32)
    mask = rng.random((20, 300)) < 0.5
    kernel = nc.apply_connectivity(kernel, mask)
    bias = rng.normal(size=300).astype(np.float32)
    frozen = np.zeros((20, 300), bool)
    frozen[:5, :40] = True
    bias_frozen = np.arange(300) < 40
    new_k, new_b = nc.reinitialize(kernel, bias, frozen, bias_frozen, mask, np.random.default_rng(4))
    where = nc._expand_to_kernel(frozen, kernel.shape)
    np.testing.assert_array_equal(new_k[where], kernel[where])
    np.testing.assert_array_equal(new_b[:40], bias[:40])
    assert not new_b[40:].any()
    assert not new_k[~nc._expand_to_kernel(mask, kernel.shape)].any()
    fresh = new_k[nc._expand_to_kernel(mask & ~frozen, kernel.shape)]
    assert not np.isin(fresh, kernel).any()
    # fan_out = 3 * 3 * 300: std sqrt(2 / 2700) = 0.0272; ~25k draws, std error 0.5 %.
    assert fresh.std() == pytest.approx(math.sqrt(2 / 2700), rel=0.03)
    dense = nc.kaiming_normal_fan_out((500, 400), np.random.default_rng(5))
    assert dense.dtype == np.float32 and dense.std() == pytest.approx(math.sqrt(2 / 400), rel=0.03)


def test_task_head_mask_multiplies_logits():
    mask = nc.task_head_mask(5, [1, 3])
    np.testing.assert_array_equal(mask, [0, 1, 0, 1, 0])
    logits = np.array([[2.0, -1.0, 3.0, 0.5, 4.0]], np.float32)
    np.testing.assert_array_equal(nc.apply_head_mask(logits, mask), [[0, -1.0, 0, 0.5, 0]])
    np.testing.assert_array_equal(nc.apply_head_mask(tf.constant(logits), mask).numpy(), [[0, -1.0, 0, 0.5, 0]])


# ------------------------------------------------------------------------ layers

def test_masked_dense_and_conv_compute_with_the_masked_kernel():
    rng = np.random.default_rng(0)
    dense = SparseMaskedDense(4)
    dense.build((None, 3))
    dense.kernel.assign(rng.normal(size=(3, 4)).astype(np.float32))
    dense.bias.assign(rng.normal(size=4).astype(np.float32))
    dense.set_connectivity(_b([1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]))
    x = rng.normal(size=(2, 3)).astype(np.float32)
    want = x @ (dense.kernel.numpy() * dense.connectivity.numpy()) + dense.bias.numpy()
    np.testing.assert_allclose(dense(x).numpy(), want, rtol=1e-5, atol=1e-6)

    conv = SparseMaskedConv2D(5, 3, padding="same")
    conv.build((None, 6, 6, 2))
    conv.kernel.assign(rng.normal(size=(3, 3, 2, 5)).astype(np.float32))
    conv_mask = _b([1, 0, 1, 0, 0], [0, 1, 1, 0, 1])
    conv.set_connectivity(conv_mask)
    images = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    kernel = conv.kernel.numpy() * conv_mask[None, None].astype(np.float32)
    want = tf.nn.conv2d(images, kernel, 1, "SAME").numpy()
    np.testing.assert_allclose(conv(images).numpy(), want, rtol=1e-5, atol=1e-5)
    assert not conv(images).numpy()[..., 3].any()  # output channel 3 has no kernel, bias 0


def test_masked_layers_serialise_and_reject_wrong_shapes():
    for layer in (SparseMaskedDense(7, name="d"), SparseMaskedConv2D(4, 3, padding="valid", name="c")):
        config = keras.saving.serialize_keras_object(layer)
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
    assert keras.saving.get_registered_object("dgm_tf>SparseMaskedConv2D") is SparseMaskedConv2D
    for net in (NispaMLP(5, hidden=(8, 6)), NispaConvNet(3, dense_units=16)):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
        assert type(clone) is type(net) and clone.get_config() == net.get_config()
    dense = SparseMaskedDense(2)
    dense.build((None, 3))
    with pytest.raises(ValueError):
        dense.set_connectivity(np.ones((2, 3), bool))


def test_frozen_parameters_stay_bit_identical_under_adam():
    rng = np.random.default_rng(0)
    conv = SparseMaskedConv2D(4, 3)
    dense = SparseMaskedDense(3)
    x = tf.constant(rng.normal(size=(8, 5, 5, 2)).astype(np.float32))
    conv.build(x.shape)
    dense.build((None, 5 * 5 * 4))
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype(np.float32))
    dense.kernel.assign(rng.normal(size=dense.kernel.shape).astype(np.float32))
    conv.set_frozen(_b([1, 0, 0, 0], [1, 1, 0, 0]), _b(1, 0, 0, 0))
    dense_frozen = rng.random((100, 3)) < 0.3
    dense.set_frozen(dense_frozen, _b(0, 1, 0))
    dense_mask = rng.random((100, 3)) < 0.5
    dense.set_connectivity(dense_mask)
    layers = [conv, dense]
    variables = [conv.kernel, conv.bias, dense.kernel, dense.bias]
    before = [v.numpy().copy() for v in variables]
    optimizer = keras.optimizers.Adam(0.01)
    for _ in range(3):
        with tf.GradientTape() as tape:
            y = dense(tf.reshape(tf.nn.relu(conv(x)), (8, -1)))
            loss = tf.reduce_sum(tf.square(y - 1.0))
        grads = mask_frozen_gradients(tape.gradient(loss, variables), variables, layers)
        optimizer.apply_gradients(zip(grads, variables))
    after = [v.numpy() for v in variables]
    conv_frozen = np.broadcast_to(_b([1, 0, 0, 0], [1, 1, 0, 0])[None, None], conv.kernel.shape)
    np.testing.assert_array_equal(after[0][conv_frozen], before[0][conv_frozen])
    assert (after[0][~conv_frozen] != before[0][~conv_frozen]).mean() > 0.9
    np.testing.assert_array_equal(after[1][0], before[1][0])
    assert (after[1][1:] != before[1][1:]).all()
    np.testing.assert_array_equal(after[2][dense_frozen], before[2][dense_frozen])
    np.testing.assert_array_equal(after[2][~dense_mask], before[2][~dense_mask])  # absent: no gradient
    trainable = dense_mask & ~dense_frozen  # a dead ReLU input can leave a few at 0 gradient
    assert (after[2][trainable] != before[2][trainable]).mean() > 0.8
    np.testing.assert_array_equal(after[3][1], before[3][1])


# ---------------------------------------------------------------------- networks

def test_mlp_masks_at_exact_density_and_fan_out_init():
    net = build_nispa_network("mlp", 10, (32, 32, 1), seed=0)
    masks = net.masks()
    assert [m.shape for m in masks] == [(1024, 400), (400, 400), (400, 400), (400, 10)]
    assert nc.connection_counts(masks) == [81920, 32000, 32000, 800]
    for layer, mask, kernel in zip(net.sparse_layers, masks, net.kernels()):
        assert not kernel[~mask].any()
        if mask.sum() >= 10_000:  # >= 10k draws: the sample std is within 0.7 % (1 sigma)
            assert kernel[mask].std() == pytest.approx(math.sqrt(2 / mask.shape[1]), rel=0.05)
        assert not layer.bias.numpy().any() and not layer.frozen_masks()[0].any()
    again = build_nispa_network("mlp", 10, (32, 32, 1), seed=0)
    for a, b in zip(net.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = build_nispa_network("mlp", 10, (32, 32, 1), seed=1)
    assert not np.array_equal(other.masks()[1], masks[1])


def test_convnet_first_conv_dense_rest_at_density_and_flatten_sources():
    net = build_nispa_network("conv", 10, (32, 32, 3), seed=0)
    masks = net.masks()
    assert [m.shape for m in masks] == [(3, 64), (64, 64), (64, 128), (128, 128), (8192, 1024), (1024, 10)]
    assert masks[0].all()
    assert nc.connection_counts(masks)[1:] == [nc.exact_count(0.1, m.size) for m in masks[1:]]
    images = tf.random.stateless_normal((2, 32, 32, 3), seed=(1, 2))
    acts = net.unit_activations(images)
    assert [tuple(a.shape) for a in acts] == [(2, 32, 32, 64), (2, 16, 16, 64), (2, 16, 16, 128),
                                              (2, 8, 8, 128), (2, 1024)]
    assert net(images).shape == (2, 10)
    # sources()[4]: flattened row r comes from channel r % 128.
    channel_ids = tf.broadcast_to(tf.range(128, dtype=tf.float32), (1, 8, 8, 128))
    np.testing.assert_array_equal(net.flatten(channel_ids).numpy()[0], net.sources()[4])
    # One NISPA step on the real network keeps every layer's count (room to regrow).
    sums = [nc.unit_activation_sums(a.numpy()) / 2 for a in acts]
    stable = nc.select_stable_units(sums, nc.p_schedule(1), None, nc.class_indicator(10, [0, 1]), masks,
                                    net.sources())
    result = nc.rewire(net.kernels(), masks, stable, np.random.default_rng(0), net.sources())
    assert result.remainder == [0] * 6 and sum(result.dropped) > 0
    assert nc.connection_counts(result.masks) == nc.connection_counts(masks)


def test_mlp_task_end_freezes_stable_paths_for_later_training():
    net = NispaMLP(4, hidden=(16, 12, 8))
    net(tf.zeros((1, 6)))
    net.initialize_sparse(0.7, np.random.default_rng(0), dense_first=False)
    x = tf.random.stateless_normal((32, 6), seed=(3, 4))
    sums = [nc.unit_activation_sums(a.numpy()) / 32 for a in net.unit_activations(x)]
    stable = nc.select_stable_units(sums, 0.8, None, nc.class_indicator(4, [0, 1]), net.masks())
    result = nc.rewire(net.kernels(), net.masks(), stable, np.random.default_rng(1))
    net.set_masks(result.masks)
    net.set_kernels(result.kernels)
    freeze = nc.freeze_masks(stable, net.masks())
    rng = np.random.default_rng(2)
    kernels, biases = zip(*[nc.reinitialize(k, b, fk, fb, m, rng) for k, b, (fk, fb), m in
                            zip(net.kernels(), net.biases(), freeze, net.masks())])
    net.set_kernels(kernels)
    net.set_biases(biases)
    net.set_frozen(freeze)
    logits_before = net(x).numpy()
    old_logits = logits_before[:, :2]
    assert (old_logits != 0).mean() > 0.5  # the stable paths carry signal (not a vacuous check)
    frozen_before = [k[nc._expand_to_kernel(fk, k.shape)] for k, (fk, _) in zip(net.kernels(), freeze)]
    # A later task trains everything it may (Adam, new classes 2, 3).
    optimizer = keras.optimizers.Adam(0.05)
    labels = tf.constant(np.arange(32) % 2 + 2)
    variables = net.trainable_variables
    for _ in range(5):
        with tf.GradientTape() as tape:
            logits = nc.apply_head_mask(net(x), nc.task_head_mask(4, [2, 3]))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        grads = mask_frozen_gradients(tape.gradient(loss, variables), variables, net.sparse_layers)
        optimizer.apply_gradients(zip(grads, variables))
    for kernel, (fk, _), old in zip(net.kernels(), freeze, frozen_before):
        np.testing.assert_array_equal(kernel[nc._expand_to_kernel(fk, kernel.shape)], old)
    # The old classes' logits depend only on frozen stable paths: bit-identical.
    logits_after = net(x).numpy()
    np.testing.assert_array_equal(logits_after[:, :2], old_logits)
    assert np.abs(logits_after[:, 2:] - logits_before[:, 2:]).max() > 0.01  # the new task did train
