"""Best-validation selection: the test row of the best validation epoch, evaluated once,
and the best epoch's classifier put back (--restore_best)."""

import keras
import numpy as np
import pytest

from dgm_tf.config import Config
from dgm_tf.data import make_scenario
from dgm_tf.engine import ValidationSelection, evaluate
from dgm_tf.methods import make_method


class EvaluateEveryEpoch(keras.callbacks.Callback):
    """What the reference does: evaluate validation and test at every eval epoch."""

    def __init__(self, method, tasks):
        super().__init__()
        self.method, self.tasks, self.rows = method, tasks, {}

    def on_epoch_end(self, epoch, logs=None):
        val, _ = evaluate(self.method, self.tasks, "val")
        test, _ = evaluate(self.method, self.tasks, "test")
        self.rows[epoch] = (float(np.mean(val)), test)


# Validation means the selection sees in each task's 5 epochs (0-based): epoch 1 is the
# best, epoch 3 ties with it (the earlier wins) and the last is not the best. Scripted,
# so the test does not hang on where training happens to validate best; test accuracy
# and the weights stay real.
SCRIPTED_VAL = [0.5, 0.9, 0.6, 0.9, 0.8]
BEST = 1


@pytest.fixture
def trained(embedded_raw, monkeypatch):
    from dgm_tf.engine import callbacks

    calls = {"n": 0}

    def scripted(method, tasks, split):
        if split != "val":
            return evaluate(method, tasks, split)
        value = SCRIPTED_VAL[calls["n"] % len(SCRIPTED_VAL)]
        calls["n"] += 1
        return [value] * len(tasks), [value] * len(tasks)

    monkeypatch.setattr(callbacks, "evaluate", scripted)  # the selection's; `evaluate` here stays real
    keras.utils.set_random_seed(0)
    scenario = make_scenario(embedded_raw, class_order=(0, 6), classes_per_task=1, num_tasks=None,
                             train_examples_per_class=64, validation_fraction=0.15, seed=0)
    cfg = Config(method="joint", dataset="embedded", class_order=(0, 6), epochs=5, eval_every=1,
                 train_examples_per_class=64, batch_size=16, ndf=4, lr_d=0.02)
    method = make_method(cfg, scenario)
    for task in scenario.tasks:
        method.begin_task(task)
        tasks = scenario.tasks[: task.index + 1]
        selection = ValidationSelection(method, tasks, every=1, epochs=cfg.epochs)
        reference = EvaluateEveryEpoch(method, tasks)
        method.train_task(task, [selection, reference])
        if task.index == 0:
            method.end_task(task)
    return method, tasks, selection, reference


def test_the_kept_weights_give_the_best_validation_epochs_test_row(trained):
    method, tasks, selection, reference = trained
    assert selection.best_epoch == BEST and selection.best_val == max(SCRIPTED_VAL)  # the earlier of a tie
    network = method.classifier_for_export()[0]
    final = [w.copy() for w in network.get_weights()]
    assert not all(np.array_equal(a, b) for a, b in zip(selection.best_weights, method.classifier_weights()))
    # finish() evaluates the kept weights; the row given (that of the weights in place)
    # is used only when the best epoch is the last.
    assert selection.finish([-1.0, -1.0]) == reference.rows[BEST][1]
    # The trained weights are back in place afterwards.
    assert all(np.array_equal(a, b) for a, b in zip(network.get_weights(), final))
    # --restore_best: the best epoch's classifier (BN statistics included) stays in place.
    assert selection.restore_best() == BEST
    assert evaluate(method, tasks, "test")[0] == reference.rows[BEST][1]


def test_a_checkpointed_selection_finishes_the_same(trained):
    method, tasks, selection, _ = trained
    final_test, _ = evaluate(method, tasks, "test")
    restored = ValidationSelection(method, tasks, every=1, epochs=5)
    restored.restore(selection.state(), dict(selection.arrays(), unrelated=np.zeros(1)))
    assert restored.finish(final_test) == selection.finish(final_test)


def test_a_checkpoint_without_the_weights_is_refused_unless_it_holds_the_row(trained):
    method, tasks, selection, _ = trained
    restored = ValidationSelection(method, tasks, every=1, epochs=5)
    with pytest.raises(ValueError, match="weights are missing"):
        restored.restore(selection.state(), {})
    # A checkpoint of an earlier version kept the row itself.
    restored.restore(dict(selection.state(), best_test=[0.25, 0.5]), {})
    assert restored.finish([0.0, 0.0]) == [0.25, 0.5]
