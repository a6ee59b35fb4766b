"""A tiny multi-task DGM run that records, at every task boundary, what the tests of
``tests/test_dgm.py`` assert on (one run per mask kind, shared by several tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dgm_tf.models import Generator


def train_task_with_hook(train_task, point, hit):
    """``train_task`` (a method's, unbound) with a callback that calls ``hit()`` before
    batch B of epoch E of task T, ``point = (T, E, B)``: a kill (tests/kill_driver.py)
    or an exception standing for one."""
    import keras

    class AtBatch(keras.callbacks.Callback):
        def __init__(self, task):
            super().__init__()
            self.task, self.epoch = task, None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.task, self.epoch, batch) == tuple(point):
                hit()

    def hooked(self, task, callbacks, initial_epoch=0):
        return train_task(self, task, [AtBatch(task.index), *callbacks], initial_epoch)

    return hooked


def assert_same_run(reference, workdir) -> None:
    """Two run directories hold the same run: results.json (wall times aside) and the
    newest checkpoint's arrays, bit for bit."""
    import json

    from dgm_tf.checkpoint import CheckpointManager

    results = [json.loads((d / "results.json").read_text()) for d in (reference, workdir)]
    for r in results:
        r.pop("wall_time_s"), r.pop("time_breakdown_s")
    assert results[0] == results[1]
    a, b = CheckpointManager(reference / "ckpt").latest(), CheckpointManager(workdir / "ckpt").latest()
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def assert_served_accuracy_matches(outputs, expected, recorded: float) -> None:
    """A SavedModel's answers on a task's test images give the accuracy the engine
    recorded for it, up to near-ties: the export and the engine's evaluation batch the
    images differently, so probabilities may differ in the last bits (~1e-7) and only an
    image whose two top classes lie that close (< 1e-5) may change its answer. With one
    class there is no tie."""
    probabilities = outputs["probabilities"].numpy()
    accuracy = float(np.mean(outputs["class_ids"].numpy() == expected))
    ties = 0
    if probabilities.shape[1] > 1:
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-5))
    assert abs(accuracy - recorded) <= (ties + 1e-9) / len(expected), (accuracy, recorded, ties)


def mock_labelled_tfds(per_class_train: int, per_class_test: int):
    """``tfds.testing.mock_data`` whose ``as_dataset`` yields every class of the builder,
    ``per_class_train`` (train split) or ``per_class_test`` images each, pixels around
    25 x label plus noise, so classes differ; PNG-encoded when the reader asks for
    ``SkipDecoding``. For the flagfiles' tfds: datasets (never downloads)."""
    import tensorflow_datasets as tfds

    def as_dataset(self, split, decoders=None, **kwargs):
        del kwargs
        shape = self.info.features["image"].shape
        n = per_class_train if split == "train" else per_class_test
        labels = np.repeat(np.arange(self.info.features["label"].num_classes), n)
        rng = np.random.default_rng(len(labels))
        images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 30, (len(labels),) + shape), 0, 255)
        ds = tf.data.Dataset.from_tensor_slices({"image": images.astype(np.uint8), "label": labels})
        if decoders and "image" in decoders:  # SkipDecoding: the reader decodes PNG itself
            ds = ds.map(lambda ex: {"image": tf.io.encode_png(ex["image"]), "label": ex["label"]})
        return ds

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def snapshot(model) -> dict[str, np.ndarray]:
    """Copies of every variable of ``model``, by path."""
    return {v.path: v.numpy().copy() for v in model.weights}


def clone_generator(generator: Generator) -> Generator:
    """An independent generator with the same architecture and weights (moving BN
    statistics included), so a test can call it in training mode without touching the
    recorded one."""
    clone = Generator.from_config(generator.get_config())
    assert [tuple(v.shape) for v in clone.weights] == [tuple(v.shape) for v in generator.weights]
    for target, source in zip(clone.weights, generator.weights):
        target.assign(source.numpy())
    return clone


@dataclass
class TaskRecord:
    """What one task of the run looked like (all arrays are copies)."""

    index: int
    widths_at_begin: tuple[int, ...]
    kernel_shapes: list[tuple[int, ...]]
    kernel_paths: list[str]
    reserved_at_begin: list[np.ndarray] | None  # the method's (padded) reserved masks
    trainer_reserved: list[np.ndarray] | None  # what the trainer's regulariser excludes
    grad_masks: list[np.ndarray] | None  # the trainer's kernel gradient factors
    replay: list[tuple[np.ndarray, np.ndarray]]
    generator_at_begin: Generator  # a clone: the generator the replay set was drawn from
    before_training: dict[str, np.ndarray]  # generator variables by path
    after_training: dict[str, np.ndarray]
    masks_at_smax: list[np.ndarray]  # the task's masks at smax after training
    reserved_after: list[np.ndarray]  # the method's reserved masks after end_task
    history: dict
    pending_growth: tuple[int, ...]
    old_task_variables: list[str]  # paths of every variable of tasks < index
    task0_images: np.ndarray | None = None  # task 0's images (fixed noise) after this task


@dataclass
class Run:
    method: object
    tasks: list[TaskRecord] = field(default_factory=list)
    task0_noise: tuple[np.ndarray, np.ndarray] | None = None  # (z, labels)


def old_task_variable_paths(generator: Generator, task: int) -> list[str]:
    """Variables only tasks before ``task`` use: their embeddings, BatchNorms (moving
    statistics included) and output heads (per class for DGMw, per task for DGMa)."""
    paths = []
    for conv, bn in zip(generator.masked_convs, generator.batch_norms):
        for k in range(task):
            paths.append(conv.task_embeddings[k].path)
            paths += [bn.gammas[k].path, bn.betas[k].path, bn.moving_means[k].path, bn.moving_variances[k].path]
    for k in range(task):
        heads = (k,) if generator.head_per_task else generator.task_classes[k]
        paths += [generator.heads.kernels[h].path for h in heads]
    return paths


def run_tasks(method, tasks) -> Run:
    """begin_task, train_task, end_task for each task in order, recording each step."""
    run = Run(method)
    smax = method.config.smax
    for task in tasks:
        method.begin_task(task)
        g = method.generator
        trainer = method.trainer
        record = dict(
            index=task.index,
            widths_at_begin=tuple(g.widths),
            kernel_shapes=[tuple(c.kernel.shape) for c in g.masked_convs],
            kernel_paths=[c.kernel.path for c in g.masked_convs],
            reserved_at_begin=None if method.reserved is None else [r.copy() for r in method.reserved],
            trainer_reserved=None if trainer.reserved is None else [r.numpy() for r in trainer.reserved],
            grad_masks=None if trainer.kernel_grad_masks is None else [m.numpy() for m in trainer.kernel_grad_masks],
            replay=[(x.copy(), y.copy()) for x, y in method.replay],
            generator_at_begin=clone_generator(g),
            before_training=snapshot(g),
            old_task_variables=old_task_variable_paths(g, task.index),
        )
        method.train_task(task, [])
        record["after_training"] = snapshot(g)
        record["masks_at_smax"] = [m.numpy() for m in g.masks(task.index, smax)]
        method.end_task(task)
        record.update(
            reserved_after=[r.copy() for r in method.reserved],
            history=dict(method.history[-1]),
            pending_growth=tuple(method.pending_growth),
        )
        if run.task0_noise is None:
            labels = np.repeat(np.array(g.task_classes[0], np.int32), 8)
            z = g.noise(tf.constant(labels), tf.random.Generator.from_seed(3)).numpy()
            run.task0_noise = (z, labels)
        z, labels = run.task0_noise
        record["task0_images"] = g(tf.constant(z), tf.constant(labels), task=0, s=smax, training=False).numpy()
        run.tasks.append(TaskRecord(**record))
    return run
