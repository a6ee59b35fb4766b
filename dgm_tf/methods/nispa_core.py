"""NISPA's pure pieces: masks, the p schedule, stable units, drop/regrow, the stop rule,
the task-end freeze and the task head mask.

NISPA (Gurbuz & Dovrolis, "NISPA: Neuro-Inspired Stability-Plasticity Adaptation for
Continual Learning in Sparse Networks", ICML 2022, arXiv 2206.09117) trains a sparse
network at a fixed density in phases. After each phase it marks the most active units
of every hidden layer *stable*, drops every connection from a *plastic* unit into a
stable one, regrows as many connections into plastic units, and stops when validation
accuracy falls; at the end of a task the stable->stable connections and the stable
units' biases freeze and everything else is re-initialised.

Everything here works on numpy arrays (no TensorFlow), with all randomness drawn from
an explicit ``numpy.random.Generator``, so a phase can be replayed exactly from
(seed, task, phase).

Conventions
-----------
The network is a chain of ``L`` sparse layers between ``L + 1`` *unit layers*: unit
layer 0 is the input (pixels for the MLP, image channels for the ConvNet), unit layers
1..L-1 the hidden units (conv: channels), unit layer L the class logits.

- ``masks[l]``: boolean connectivity of sparse layer l, shape ``(rows, units[l + 1])``
  in Keras layout (rows = inputs of the layer; conv: input channels, one entry per whole
  kernel). ``masks[l][r, j]`` is the connection from row r to unit j of layer l + 1.
- ``sources[l]``: ``None`` when row r *is* unit r of layer l, else an int array giving
  the unit of layer l that feeds row r. The ConvNet's first dense layer reads the
  flattened NHWC feature map, so its row r comes from channel ``r % C``.
- ``stable[l]``: boolean array over the units of unit layer l.
- Connections are counted per mask entry (a conv kernel is one connection; the
  reference counts its kh*kw weights, which is the same up to that factor).

Reference: github BurakGurbuz97/NISPA (the task-incremental code in ``NISPA/NISPA/``;
``NISPA_Replay/`` for the class-incremental variant). Each function names the file and
function it follows and where it departs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Hyperparameters of the reference's experiment scripts (NISPA/EFMNIST_experiment.sh,
# NISPA/CIFAR10_experiment.sh): --step_size_param 30, --recovery_perc 0.75.
P_SCHEDULE_K = 30.0
RECOVERY_POINTS = 0.75  # a_f, in percentage points of validation accuracy
MIN_PHASES = 2  # accuracy-based stops are considered from phase MIN_PHASES + 1 on
P_MIN = 0.05  # stop once p <= 5 %


# ----------------------------------------------------------------------------- masks

def exact_count(density: float, size: int) -> int:
    """Number of connections kept at ``density`` among ``size``: round half up."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return int(math.floor(density * size + 0.5))


def random_connectivity(shape: Sequence[int], density: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of ``shape`` with exactly ``exact_count(density, size)`` ones.

    The ones are a uniform random subset (without replacement). The reference draws
    every entry independently instead (``np.random.choice([0, 1], p=[1 - d, d])``,
    BurakGurbuz97/NISPA, NISPA/NISPA/model.py, ``random_prune``), so its count is
    binomial around ``d * size``; an exact count makes "density stays constant" a
    checkable statement and does not change the distribution of which connections
    exist beyond that. Conv layers call this with the (in, out) channel shape: sparsity
    per whole kernel (arXiv 2206.09117, Sec. 4 / the same ``random_prune``).
    """
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape))
    keep = exact_count(density, size)
    flat = np.zeros(size, bool)
    flat[rng.choice(size, size=keep, replace=False)] = True
    return flat.reshape(shape)


def connection_counts(masks: Sequence[np.ndarray]) -> list[int]:
    """Number of existing connections per layer."""
    return [int(np.count_nonzero(m)) for m in masks]


# ------------------------------------------------------------------------- p schedule

def p_schedule(phase: int, k: float = P_SCHEDULE_K) -> float:
    """Fraction of a layer's activation the stable units must carry after ``phase``.

    p = 0.5 (1 + cos(pi * phase / k)), phases numbered from 1 (the first selection,
    after phase 1, uses p(1) = 0.9973 with k = 30). Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/utils.py, ``cosine_anneling``, called as ``p_schedule(t)`` with t = 1, 2,
    ... in NISPA/NISPA/learner.py, ``Learner.task_train``; arXiv 2206.09117, Sec. 3
    (cosine annealing of a_p).
    """
    if phase < 1:
        raise ValueError(f"phases are numbered from 1, got {phase}")
    return 0.5 * (1.0 + math.cos(math.pi * phase / k))


# ---------------------------------------------------------------------- stable units

def unit_activation_sums(activation: np.ndarray) -> np.ndarray:
    """Per-unit activation summed over the batch and, for conv maps, over space.

    ``activation`` is a post-ReLU output ``(N, units)`` or ``(N, H, W, channels)``;
    dividing the sum over all of a task's training batches by the number of examples
    gives the mean activation the selection ranks. Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/utils.py, ``compute_average_activation`` (sum over axes (0, 2, 3) of NCHW
    maps, divided by the dataset size).
    """
    activation = np.asarray(activation, np.float64)
    return activation.reshape(-1, activation.shape[-1]).sum(axis=0)


def select_top_units(activation: np.ndarray, p: float) -> np.ndarray:
    """Units in descending mean activation until they carry a fraction ``p`` of the total.

    The unit whose activation makes the running sum reach ``p * total`` (``>=``) is
    included; ties are broken by the lower index (stable sort). If every activation is
    0 the first unit is returned alone (the running sum 0 already reaches 0). Returns a
    boolean array over the layer's units. Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/utils.py, ``pick_top_neurons`` (``accumulate >= total * percentage / 100``
    with percentage = 100 p; its ``np.argsort`` is not stable); arXiv 2206.09117, Sec. 3
    (stable units carry a_p of the layer's total activation).
    """
    activation = np.asarray(activation, np.float64)
    order = np.argsort(-activation, kind="stable")
    running = np.cumsum(activation[order])
    reached = np.flatnonzero(running >= activation.sum() * p)
    count = int(reached[0]) + 1 if reached.size else activation.size
    selected = np.zeros(activation.size, bool)
    selected[order[:count]] = True
    return selected


def _rows_source(masks: Sequence[np.ndarray], sources: Sequence | None, layer: int) -> np.ndarray:
    src = None if sources is None else sources[layer]
    if src is None:
        return np.arange(masks[layer].shape[0])
    src = np.asarray(src, np.int64)
    if src.shape != (masks[layer].shape[0],):
        raise ValueError(f"sources[{layer}] must have one entry per row of masks[{layer}]")
    return src


def unit_counts(masks: Sequence[np.ndarray], sources: Sequence | None = None) -> list[int]:
    """Units in each of the L + 1 unit layers (input, hidden..., output)."""
    first = _rows_source(masks, sources, 0)
    counts = [int(first.max()) + 1 if first.size else 0]
    for l, mask in enumerate(masks):
        rows = _rows_source(masks, sources, l)
        if l > 0 and rows.size and (rows.min() < 0 or rows.max() >= counts[l]):
            raise ValueError(f"sources[{l}] must index the {counts[l]} units of unit layer {l}")
        counts.append(int(mask.shape[1]))
    return counts


def has_stable_input(mask: np.ndarray, rows_source: np.ndarray, source_stable: np.ndarray) -> np.ndarray:
    """For every unit of the next layer: does it have a connection from a stable unit?"""
    stable_rows = np.asarray(source_stable, bool)[rows_source]
    return (np.asarray(mask, bool) & stable_rows[:, None]).any(axis=0)


def select_stable_units(
    mean_activations: Sequence[np.ndarray],
    p: float,
    previous_stable: Sequence[np.ndarray] | None,
    output_stable: np.ndarray,
    masks: Sequence[np.ndarray],
    sources: Sequence | None = None,
    demote_unsupported: bool = True,
) -> list[np.ndarray]:
    """The stable units after a phase, one boolean array per unit layer (0..L).

    - Unit layer 0 (the input) is stable in full.
    - Hidden unit layer l (1..L-1): ``select_top_units(mean_activations[l - 1], p)``.
      With ``demote_unsupported``, a newly selected unit with no existing connection
      from a stable unit of layer l - 1 (its final set, computed first, so demotions
      cascade forward) goes back to plastic. The result is united with
      ``previous_stable[l]`` (earlier tasks' stable units stay stable whatever happens).
    - Unit layer L (the logits): ``output_stable`` (the classes seen so far, current
      task included) united with ``previous_stable[L]``.

    ``mean_activations`` has one entry per hidden unit layer (L - 1 entries), each the
    mean post-ReLU activation over the task's training data (conv: summed over space;
    for a conv layer followed by max pooling the reference measures after the pool).

    Follows BurakGurbuz97/NISPA, NISPA/NISPA/utils.py, ``compute_stable_neurons`` (input
    all stable, outputs = classes so far) and ``compute_stable_and_drop_connections``
    (union with the earlier tasks' set); arXiv 2206.09117, Sec. 3. The demotion is
    ``fix_dead_stable_units`` of the same file, which the reference computes *after* the
    union and then discards (its result is assigned to a variable nobody reads), so the
    reference never demotes: ``demote_unsupported=False`` reproduces it.
    """
    counts = unit_counts(masks, sources)
    if len(mean_activations) != len(counts) - 2:
        raise ValueError(f"need {len(counts) - 2} hidden activations, got {len(mean_activations)}")
    stable = [np.ones(counts[0], bool)]
    for l in range(1, len(counts) - 1):
        activation = np.asarray(mean_activations[l - 1])
        if activation.shape != (counts[l],):
            raise ValueError(f"activations of unit layer {l} must have shape ({counts[l]},)")
        new = select_top_units(activation, p)
        previous = np.zeros(counts[l], bool) if previous_stable is None else np.asarray(previous_stable[l], bool)
        if demote_unsupported:
            supported = has_stable_input(masks[l - 1], _rows_source(masks, sources, l - 1), stable[l - 1])
            new &= supported
        stable.append(new | previous)
    output = np.asarray(output_stable, bool)
    if output.shape != (counts[-1],):
        raise ValueError(f"output_stable must have shape ({counts[-1]},)")
    previous = np.zeros(counts[-1], bool) if previous_stable is None else np.asarray(previous_stable[-1], bool)
    stable.append(output | previous)
    return stable


def class_indicator(num_classes: int, classes: Sequence[int]) -> np.ndarray:
    """Boolean array over ``num_classes`` with True at ``classes``."""
    out = np.zeros(int(num_classes), bool)
    out[np.asarray(list(classes), np.int64)] = True
    return out


# --------------------------------------------------------------------- drop / regrow

def plastic_to_stable(masks: Sequence[np.ndarray], stable: Sequence[np.ndarray],
                      sources: Sequence | None = None) -> list[np.ndarray]:
    """Per layer, the positions (existing or not) that lead from a plastic into a stable unit."""
    out = []
    for l, mask in enumerate(masks):
        rows = _rows_source(masks, sources, l)
        source_plastic = ~np.asarray(stable[l], bool)[rows]
        out.append(source_plastic[:, None] & np.asarray(stable[l + 1], bool)[None, :])
    return out


def drop_connections(masks: Sequence[np.ndarray], stable: Sequence[np.ndarray],
                     sources: Sequence | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Remove every connection from a plastic unit into a stable unit.

    Returns the new masks and the number of connections dropped per layer.
    Stable->stable, stable->plastic and plastic->plastic connections stay. Follows
    BurakGurbuz97/NISPA, NISPA/NISPA/utils.py, ``compute_freeze_and_drop`` (drop mask: the
    row of every stable target outside the stable sources) and ``drop_connections``;
    arXiv 2206.09117, Sec. 3 ("connection dropping").
    """
    new_masks, dropped = [], []
    for mask, drop in zip(masks, plastic_to_stable(masks, stable, sources)):
        mask = np.asarray(mask, bool)
        dropped.append(int(np.count_nonzero(mask & drop)))
        new_masks.append(mask & ~drop)
    return new_masks, dropped


def connect_orphans(masks: Sequence[np.ndarray], stable: Sequence[np.ndarray], budget: Sequence[int],
                    rng: np.random.Generator, sources: Sequence | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Give every plastic hidden unit without outgoing connections one, to a plastic unit.

    For hidden unit layer l (1..L-1), in increasing unit order, a plastic unit none of
    whose rows in ``masks[l]`` has a connection gets one connection to a plastic unit of
    layer l + 1 drawn uniformly (for the ConvNet's flattened layer, from one of the
    channel's rows drawn uniformly). Each link spends one connection of ``budget[l]`` (the
    connections dropped from that layer); nothing is added once it is spent or if layer
    l + 1 has no plastic unit. Returns (masks, the links added per layer, the remaining
    budget).

    Follows BurakGurbuz97/NISPA, NISPA/NISPA/utils.py, ``fix_no_outgoing``. The reference
    checks a ConvNet channel's outgoing connections into the first dense layer by
    looking at the single flattened column whose index equals the channel number; here
    all of the channel's columns are checked.
    """
    masks = [np.array(m, bool) for m in masks]
    budget = [int(b) for b in budget]
    added = [np.zeros_like(m) for m in masks]
    for l in range(1, len(masks)):
        plastic_targets = np.flatnonzero(~np.asarray(stable[l + 1], bool))
        if budget[l] <= 0 or plastic_targets.size == 0:
            continue
        rows = _rows_source(masks, sources, l)
        units = int(np.asarray(stable[l]).size)
        has_out = np.bincount(rows, weights=masks[l].any(axis=1), minlength=units) > 0
        for unit in np.flatnonzero(~np.asarray(stable[l], bool)):
            if budget[l] <= 0:
                break
            if has_out[unit]:
                continue
            unit_rows = np.flatnonzero(rows == unit)
            if unit_rows.size == 0:
                continue
            target = plastic_targets[rng.integers(plastic_targets.size)]
            row = unit_rows[rng.integers(unit_rows.size)] if unit_rows.size > 1 else unit_rows[0]
            masks[l][row, target] = True
            added[l][row, target] = True
            budget[l] -= 1
    return masks, added, budget


def regrow_connections(masks: Sequence[np.ndarray], stable: Sequence[np.ndarray], budget: Sequence[int],
                       rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Add ``budget[l]`` connections per layer, uniformly among absent ones into plastic units.

    Candidates are the absent positions of ``masks[l]`` whose target (unit of layer
    l + 1) is plastic; the source may be stable or plastic. If there are no more
    candidates than the budget, all of them are added and the rest of the budget is
    returned as the remainder (the layer then ends below its density; this happens in
    the logit layer once every class is stable, i.e. in the last task). Returns (masks,
    the connections added per layer, the remainder per layer).

    Follows BurakGurbuz97/NISPA, NISPA/NISPA/grow.py, ``full_random`` (candidates) and
    ``grow_connection_A2B`` (all candidates if they do not exceed the request, else a
    uniform draw without replacement; what cannot be placed is returned as remainder);
    the learner's second ``full_random`` call on the remainder finds no candidate left
    and is therefore omitted. arXiv 2206.09117, Sec. 3 ("connection growth").
    """
    new_masks, added, remainder = [], [], []
    for l, mask in enumerate(masks):
        mask = np.array(mask, bool)
        grown = np.zeros_like(mask)
        want = int(budget[l])
        candidates = np.flatnonzero(~mask & ~np.asarray(stable[l + 1], bool)[None, :])
        if want > 0 and candidates.size:
            if candidates.size <= want:
                chosen = candidates
            else:
                chosen = candidates[rng.choice(candidates.size, size=want, replace=False)]
            grown.flat[chosen] = True
            mask.flat[chosen] = True
            want -= chosen.size
        new_masks.append(mask)
        added.append(grown)
        remainder.append(max(want, 0))
    return new_masks, added, remainder


def _expand_to_kernel(per_connection: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """(rows, out) -> the kernel's shape (conv: broadcast over the kernel's kh, kw)."""
    per_connection = np.asarray(per_connection)
    if len(kernel_shape) == 2:
        return per_connection
    return np.broadcast_to(per_connection[None, None], kernel_shape)


def growth_weight_stats(kernel: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of the layer's non-zero existing weights.

    Follows BurakGurbuz97/NISPA, NISPA/NISPA/grow.py, ``weight_init`` ('normal':
    ``np.mean``/``np.std`` of ``w[np.nonzero(w)]``, where absent weights are already 0).
    Returns (0, 0) if the layer has no non-zero weight.
    """
    kernel = np.asarray(kernel, np.float64)
    values = kernel[_expand_to_kernel(np.asarray(mask, bool), kernel.shape)]
    values = values[values != 0]
    if values.size == 0:
        return 0.0, 0.0
    return float(values.mean()), float(values.std())


def apply_connectivity(kernel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The kernel with every absent connection's weights set to 0."""
    kernel = np.asarray(kernel)
    return np.where(_expand_to_kernel(np.asarray(mask, bool), kernel.shape), kernel, 0).astype(kernel.dtype)


@dataclass(frozen=True)
class RewireResult:
    """Outcome of one drop/regrow step (``rewire``); lists are per sparse layer."""

    masks: list
    kernels: list
    dropped: list  # connections dropped (plastic -> stable)
    orphan_links: list  # links given to plastic units without outgoing connections
    regrown: list  # connections added by the uniform regrowth
    remainder: list  # dropped connections that found no place (density fell by this much)


def rewire(kernels: Sequence[np.ndarray], masks: Sequence[np.ndarray], stable: Sequence[np.ndarray],
           rng: np.random.Generator, sources: Sequence | None = None) -> RewireResult:
    """Drop plastic->stable connections, relink orphans, regrow, initialise new weights.

    1. ``drop_connections``; the dropped weights become 0.
    2. ``connect_orphans`` with each layer's dropped count as budget; the new links
       start at weight 0 (in the reference they keep the 0 that absent weights hold:
       ``fix_no_outgoing`` only sets the mask).
    3. ``regrow_connections`` with the rest of the budget; each new connection's weights
       are drawn from N(mean, std) of the layer's non-zero weights after steps 1-2
       (``growth_weight_stats``), one draw per weight (a conv kernel gets kh*kw draws).

    Per layer, connections after = before - remainder; the remainder is 0 whenever a
    layer has at least as many absent positions into plastic units as it dropped.
    ``kernels`` are Keras-layout arrays (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``).
    Follows BurakGurbuz97/NISPA, NISPA/NISPA/learner.py, ``Learner.task_train`` (the
    sequence compute_stable_and_drop_connections -> fix_no_outgoing ->
    grow_connection_A2B with --grow_init normal); arXiv 2206.09117, Sec. 3.
    """
    dropped_masks, dropped = drop_connections(masks, stable, sources)
    linked_masks, orphan_links, budget = connect_orphans(dropped_masks, stable, dropped, rng, sources)
    new_masks, regrown, remainder = regrow_connections(linked_masks, stable, budget, rng)
    new_kernels = []
    for kernel, linked, grown, final in zip(kernels, linked_masks, regrown, new_masks):
        kernel = apply_connectivity(kernel, linked)  # dropped -> 0; orphan links hold 0
        mean, std = growth_weight_stats(kernel, linked)
        where = _expand_to_kernel(grown, kernel.shape)
        draws = rng.normal(mean, std, size=int(np.count_nonzero(where)))
        kernel = kernel.copy()
        kernel[where] = draws.astype(kernel.dtype)
        new_kernels.append(apply_connectivity(kernel, final))
    return RewireResult(new_masks, new_kernels, dropped, orphan_links, regrown, remainder)


# ------------------------------------------------------------------------- stop rule

def should_stop(phase: int, val_accuracy_pct: float, best_pct: float, *, a_f: float = RECOVERY_POINTS,
                k: float = P_SCHEDULE_K, min_phases: int = MIN_PHASES, p_min: float = P_MIN) -> bool:
    """Whether the phase loop ends after ``phase`` (then the state of phase - 1 is kept).

    Stops when the phase's validation accuracy is more than ``a_f`` percentage points
    below the best of the earlier phases of this task (``best_pct``, 0 before any) and
    ``phase > min_phases``, or when p(phase) <= ``p_min`` (with k = 30: phase 26, even
    if its accuracy is fine). Accuracies are in percent (the reference's ``acc1`` is
    100 * correct / n), so a_f = 0.75 means 0.75 points. Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/learner.py, ``Learner.task_train``:
    ``(acc_new < acc_prev - recovery_perc and t > 2) or stable_perc <= 5``; the replay
    variant makes the 2 a flag (NISPA_Replay: ``--min_phases``). arXiv 2206.09117, Sec. 3.
    """
    return (val_accuracy_pct < best_pct - a_f and phase > min_phases) or p_schedule(phase, k) <= p_min


def run_stop_rule(val_accuracies_pct: Sequence[float], **kwargs) -> tuple[int, int] | None:
    """Replay the stop rule over the accuracies of phases 1, 2, ...

    Returns (the phase after which the loop stops, the phase whose state is kept =
    that phase - 1; 0 would mean the state before the task's first phase) or None if
    the sequence ends first. The best so far is the maximum over the phases that did
    not stop the loop (``acc_prev = max(acc_new, acc_prev)`` in the reference,
    NISPA/NISPA/learner.py). Keyword arguments go to ``should_stop``.
    """
    best = 0.0
    for phase, accuracy in enumerate(val_accuracies_pct, start=1):
        if should_stop(phase, float(accuracy), best, **kwargs):
            return phase, phase - 1
        best = max(best, float(accuracy))
    return None


def phase_best_epoch(val_accuracies: Sequence[float]) -> int:
    """Index of the epoch a phase keeps: the first with the highest validation accuracy.

    The reference's ``training_CL`` (NISPA/NISPA/training.py) returns a copy of the
    network from the epoch with the strictly highest accuracy (threshold starting at 0)
    and that epoch's accuracy is the phase's. It differs only when every epoch scores
    0: the reference then returns the last epoch's weights with epoch 0's accuracy;
    here epoch 0 is kept.
    """
    accuracies = np.asarray(val_accuracies, np.float64)
    if accuracies.size == 0:
        raise ValueError("a phase has at least one epoch")
    return int(np.argmax(accuracies))


# ------------------------------------------------------------------------ task end

def freeze_masks(stable: Sequence[np.ndarray], masks: Sequence[np.ndarray], sources: Sequence | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (connections to freeze, biases to freeze) from the task's final stable sets.

    Connections: every position (rows, out) from a stable unit into a stable unit,
    whether the connection exists or not (absent ones stay absent: regrowth only targets
    plastic units). Biases: those of the stable units of the layer's output unit layer
    (for the logit layer: the classes seen so far). Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/utils.py, ``compute_freeze_and_drop`` (freeze masks), applied at the end
    of the task in NISPA/NISPA/learner.py; arXiv 2206.09117, Sec. 3.
    """
    out = []
    for l, mask in enumerate(masks):
        rows = _rows_source(masks, sources, l)
        source_stable = np.asarray(stable[l], bool)[rows]
        target_stable = np.asarray(stable[l + 1], bool)
        out.append((source_stable[:, None] & target_stable[None, :], target_stable.copy()))
    return out


def kaiming_normal_fan_out(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """N(0, 2 / fan_out) for a Keras-layout kernel (Dense (in, out); Conv (kh, kw, in, out)).

    fan_out = out (Dense) or kh * kw * out (Conv), as PyTorch's
    ``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` on the transposed layouts
    (BurakGurbuz97/NISPA, NISPA/NISPA/model.py, ``MLP._initialize_weights`` and
    ``re_initialize``). Drawn in float32 (``standard_normal(dtype=float32)``, twice as fast
    as float64 draws for the ConvNet's 8.4M-weight dense layer).
    """
    shape = tuple(int(d) for d in shape)
    fan_out = shape[-1] * (int(np.prod(shape[:-2])) if len(shape) > 2 else 1)
    return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_out))


def reinitialize(kernel: np.ndarray, bias: np.ndarray, kernel_frozen: np.ndarray, bias_frozen: np.ndarray,
                 mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Task end: new Kaiming fan-out weights and zero biases except where frozen.

    Frozen weights and biases keep their values exactly; absent connections are 0; the
    mask is not touched. Follows BurakGurbuz97/NISPA, NISPA/NISPA/model.py,
    ``MLP.re_initialize`` / ``ConvNet.re_initialize`` (kaiming_normal_ fan_out, bias 0,
    then the frozen entries copied back); arXiv 2206.09117, Sec. 3.
    """
    kernel = np.asarray(kernel, np.float32)
    fresh = kaiming_normal_fan_out(kernel.shape, rng)
    frozen = _expand_to_kernel(np.asarray(kernel_frozen, bool), kernel.shape)
    new_kernel = apply_connectivity(np.where(frozen, kernel, fresh), mask)
    new_bias = np.where(np.asarray(bias_frozen, bool), np.asarray(bias, np.float32), np.float32(0))
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


# --------------------------------------------------------------------------- heads

def task_head_mask(num_classes: int, task_classes: Sequence[int]) -> np.ndarray:
    """0/1 float32 vector over the logits: 1 for the task's classes.

    The task-incremental model multiplies its logits by it in training and test, so the
    other classes' logits are 0 (not -inf) and still enter the softmax and the argmax.
    Follows BurakGurbuz97/NISPA, NISPA/NISPA/model.py, ``MLP.forward`` /
    ``ConvNet.forward`` with ``current_classes``.
    """
    return class_indicator(num_classes, task_classes).astype(np.float32)


def apply_head_mask(logits, head_mask):
    """``logits * head_mask`` (works on numpy arrays and tensors alike)."""
    return logits * head_mask
