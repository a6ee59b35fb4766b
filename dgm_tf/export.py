"""Per-task SavedModels in TensorFlow Serving's layout, written atomically.

After task t the engine writes, under ``<workdir>/export``::

    classifier/<t+1>/   SavedModel: uint8 images -> probabilities, class_ids, class_names
    generator/<t+1>/    SavedModel: (class_ids, seed) -> uint8 images (the generative memory)
    models.config       a ModelServerConfig (text proto) naming both models

TF Serving watches each model's base path and loads every child directory whose name
is an integer as a version. A version directory is therefore built under a temporary
name that is not an integer (``.tmp-<version>-<pid>``) and renamed into place only
when complete, so a server never sees a half-written version (tensorflow/serving
issues #1086 and #631 report servers loading partial exports). Nothing here needs
dgm_tf on the server: the signatures include the pixel scaling and resizing.

Signatures of ``classifier/<v>`` (see README, "Serving"):

* ``serving_default``: ``images`` uint8 ``[None, H, W, C]`` raw pixels at the dataset's
  size (scaled to [-1, 1] and resized to 32x32 inside) ->
  ``probabilities`` float32 ``[None, K]`` (K = classes seen by version v, column i is
  ``classes.json``'s entry i), ``class_ids`` int64 ``[None]`` (the dataset's class id
  of the most probable class), ``class_names`` string ``[None]``.
* ``serving_float``: ``images`` float32 ``[None, 32, 32, C]`` already in [-1, 1] (the
  model's own input) -> the same outputs.

Signature of ``generator/<v>``: ``serving_default``: ``class_ids`` int64 ``[None]``
(dataset class ids learned by version v) and ``seed`` int64 ``[None]`` -> ``images``
uint8 ``[None, 32, 32, C]``; each image depends only on its (class id, seed) pair.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from dgm_tf import io_utils

CLASSES_FILE = "classes.json"
WARMUP_FILE = "tf_serving_warmup_requests"  # read by TF Serving from assets.extra/
MODEL_NAMES = ("classifier", "generator")
_TMP_PREFIX = ".tmp-"
_WARMUP_IMAGES = 2


# --------------------------------------------------------------------------------------
# Atomic version directories.
# --------------------------------------------------------------------------------------


def clean_stale_temporaries(base: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporary version directories a killed process left behind.

    A complete old version set aside during a replacement (``.tmp-old-<v>-<pid>``) is
    put back if the process died before the new one took its place.
    """
    removed = []
    if base.is_dir():
        for child in sorted(base.iterdir()):
            if not (child.name.startswith(_TMP_PREFIX) and child.is_dir()):
                continue
            parts = child.name[len(_TMP_PREFIX) :].split("-")
            if parts[0] == "old" and len(parts) >= 2 and parts[1].isdigit() and not (base / parts[1]).exists():
                os.rename(child, base / parts[1])
                continue
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def write_version(base: pathlib.Path, version: int, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Build version ``version`` under ``base`` with ``build(tmp_dir)`` and rename it in.

    The temporary directory is removed if ``build`` fails; an existing version of the
    same number (a re-export) is replaced only after the new one is complete.
    """
    base.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(base)
    final = base / str(int(version))
    tmp = base / f"{_TMP_PREFIX}{int(version)}-{os.getpid()}"
    try:
        try:
            build(tmp)
        except tf.errors.OpError as e:  # e.g. a full disk inside tf.saved_model.save
            raise OSError(errno.EIO, e.message.splitlines()[0] if e.message else str(e), str(tmp)) from None
        _fsync_tree(tmp)
        if final.exists():
            old = base / f"{_TMP_PREFIX}old-{int(version)}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        io_utils.fsync_dir(base)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_tree(root: pathlib.Path) -> None:
    """Flush every file and directory of ``root`` to disk before the rename publishes it."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        io_utils.fsync_dir(dirpath)


# --------------------------------------------------------------------------------------
# Serving modules.
# --------------------------------------------------------------------------------------


class _Untracked:
    """Holds a Keras model out of tf.Module's tracking: saving the model object itself
    would make TF trace Keras's own default signature (which fails for models whose
    call takes more than images). Its variables are tracked explicitly instead."""

    def __init__(self, model):
        self.model = model


class ClassifierServing(tf.Module):
    """The continual classifier with its preprocessing, for TF Serving.

    Args:
        network: Object holding the classifier's variables (saved with the module).
        logits_fn: Model-space images (float32 [N, 32, 32, C] in [-1, 1]) -> logits
            over every class seen so far, inference mode.
        raw_shape: ``(H, W, C)`` of the dataset's images (the uint8 input).
        model_size: Height and width the network expects (32).
        class_ids: Dataset class id of each logit column.
        class_names: Name of each logit column.
    """

    def __init__(self, network, logits_fn, raw_shape, model_size, class_ids, class_names):
        super().__init__(name="classifier_serving")
        self._network = _Untracked(network)
        self.saved_variables = list(network.variables)
        self._logits_fn = logits_fn
        self.raw_shape = tuple(int(d) for d in raw_shape)
        self.model_size = int(model_size)
        self.class_ids = tf.constant(np.asarray(class_ids, np.int64))
        self.class_names = tf.constant([str(n) for n in class_names])
        h, w, c = self.raw_shape
        self.serve_uint8 = tf.function(
            self._serve_uint8,
            input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")],
            autograph=False,
        )
        self.serve_float = tf.function(
            self._serve_float,
            input_signature=[tf.TensorSpec([None, self.model_size, self.model_size, c], tf.float32, name="images")],
            autograph=False,
        )

    def _outputs(self, x):
        logits = tf.cast(self._logits_fn(x), tf.float32)
        best = tf.argmax(logits, axis=-1)
        return {
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_ids": tf.gather(self.class_ids, best),
            "class_names": tf.gather(self.class_names, best),
        }

    def _check_shape(self, images, expected):
        # A restored signature does not enforce its declared shape; TF Serving would
        # resize or fail deep inside the graph. Name the problem instead.
        return tf.debugging.assert_equal(
            tf.shape(images)[1:],
            tf.constant(expected, tf.int32),
            message=f"images must have shape [N, {', '.join(map(str, expected))}] (N images of "
            f"height, width, channels); got another shape",
        )

    def _serve_uint8(self, images):
        with tf.control_dependencies([self._check_shape(images, self.raw_shape)]):
            images = tf.identity(images)
        # Same steps as dgm_tf.data.to_model_images: /255, bilinear resize without
        # antialiasing, *2-1, clip.
        x = tf.cast(images, tf.float32) / 255.0
        if self.raw_shape[:2] != (self.model_size, self.model_size):
            x = tf.image.resize(x, (self.model_size, self.model_size), method="bilinear", antialias=False)
        x = tf.clip_by_value(x * 2.0 - 1.0, -1.0, 1.0)
        return self._outputs(x)

    def _serve_float(self, images):
        size = (self.model_size, self.model_size, self.raw_shape[2])
        with tf.control_dependencies([self._check_shape(images, size)]):
            images = tf.identity(images)
        return self._outputs(images)


class GeneratorServing(tf.Module):
    """The generative memory: images of requested classes, for TF Serving.

    Args:
        generator: A ``Generator`` (or anything with its call signature and
            ``nz``, ``num_code_classes``, ``task_classes``).
        s: Mask scale used for generation (smax).
        class_ids: Dataset class id of each model label the generator knows.
    """

    def __init__(self, generator, s: float, class_ids: Sequence[int]):
        super().__init__(name="generator_serving")
        self._generator = _Untracked(generator)
        self.saved_variables = list(generator.variables)
        self.s = float(s)
        labels = [c for cs in generator.task_classes for c in cs]
        self.num_tasks = len(generator.task_classes)
        known = [int(class_ids[label]) for label in labels]
        self._known_text = ", ".join(str(c) for c in known)  # a str: tf.Module wraps lists
        self.known_ids = tf.constant(np.asarray(known, np.int64))
        self.known_labels = tf.constant(np.asarray(labels, np.int32))
        self.task_of_label = tf.constant(
            np.asarray([t for t, cs in enumerate(generator.task_classes) for _ in cs], np.int32)
        )
        self.serve = tf.function(
            self._serve,
            input_signature=[
                tf.TensorSpec([None], tf.int64, name="class_ids"),
                tf.TensorSpec([None], tf.int64, name="seed"),
            ],
            autograph=False,
        )

    def _serve(self, class_ids, seed):
        g = self._generator.model
        match = tf.equal(class_ids[:, None], self.known_ids[None, :])
        checks = [
            tf.debugging.assert_equal(
                tf.reduce_all(tf.reduce_any(match, axis=1)),
                True,
                message=f"class_ids must be among the classes this version learned: {self._known_text}",
            ),
            tf.debugging.assert_equal(
                tf.shape(class_ids), tf.shape(seed), message="class_ids and seed need the same length"
            ),
        ]
        with tf.control_dependencies(checks):
            labels = tf.gather(self.known_labels, tf.argmax(tf.cast(match, tf.int32), axis=1))
        # One noise vector per (seed) row, independent of the rest of the batch.
        seeds = tf.stack([seed, tf.zeros_like(seed)], axis=1)
        z = tf.map_fn(
            lambda s: tf.random.stateless_normal([g.nz], seed=s),
            seeds,
            fn_output_signature=tf.TensorSpec([g.nz], tf.float32),
        )
        code = tf.one_hot(labels, g.num_code_classes, dtype=z.dtype)
        z = tf.concat([code, z[:, g.num_code_classes :]], axis=1)
        tasks = tf.gather(self.task_of_label, labels)
        rows = tf.range(tf.shape(labels)[0])
        parts_z = tf.dynamic_partition(z, tasks, self.num_tasks)
        parts_y = tf.dynamic_partition(labels, tasks, self.num_tasks)
        parts_i = tf.dynamic_partition(rows, tasks, self.num_tasks)
        images = [
            g(parts_z[t], parts_y[t], task=t, s=self.s, training=False) for t in range(self.num_tasks)
        ]
        x = tf.dynamic_stitch(parts_i, images)
        pixels = tf.cast(tf.round((tf.clip_by_value(x, -1.0, 1.0) + 1.0) * 127.5), tf.uint8)
        return {"images": pixels}


# --------------------------------------------------------------------------------------
# Writing the exports.
# --------------------------------------------------------------------------------------


def classes_document(version: int, class_ids: Sequence[int], class_names: Sequence[str]) -> dict:
    return {
        "version": int(version),
        "note": "probabilities[:, i] is the probability of classes[i]; columns keep their "
        "meaning across versions and new versions append columns",
        "classes": [
            {"index": i, "class_id": int(c), "name": str(n)} for i, (c, n) in enumerate(zip(class_ids, class_names))
        ],
    }


def _warmup_log(model_name: str, inputs: dict[str, np.ndarray]) -> bytes:
    """A serialized PredictionLog, the record format TF Serving replays from
    ``assets.extra/tf_serving_warmup_requests`` at load time
    (https://www.tensorflow.org/tfx/serving/saved_model_warmup)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
    )
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    ).SerializeToString()


def _save(module: tf.Module, directory: pathlib.Path, signatures: dict, classes: dict, warmup: bytes) -> None:
    directory.mkdir(parents=True)
    classes_path = directory / CLASSES_FILE
    classes_path.write_text(json.dumps(classes, indent=2) + "\n")
    module.classes_asset = tf.saved_model.Asset(str(classes_path))  # copied to assets/
    tf.saved_model.save(module, str(directory), signatures=signatures)
    extra = directory / "assets.extra"
    extra.mkdir()
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        writer.write(warmup)


def export_classifier(
    base: pathlib.Path,
    version: int,
    network,
    logits_fn,
    raw_shape: Sequence[int],
    class_ids: Sequence[int],
    class_names: Sequence[str],
    model_size: int = 32,
) -> pathlib.Path:
    """Write ``base/<version>`` atomically; see the module docstring for the signatures."""
    module = ClassifierServing(network, logits_fn, raw_shape, model_size, class_ids, class_names)
    signatures = {
        "serving_default": module.serve_uint8.get_concrete_function(),
        "serving_float": module.serve_float.get_concrete_function(),
    }
    warm = {"images": np.zeros((_WARMUP_IMAGES,) + tuple(int(d) for d in raw_shape), np.uint8)}
    warmup = _warmup_log("classifier", warm)
    classes = classes_document(version, class_ids, class_names)
    return write_version(base, version, lambda tmp: _save(module, tmp, signatures, classes, warmup))


def export_generator(
    base: pathlib.Path,
    version: int,
    generator,
    s: float,
    class_ids: Sequence[int],
    class_names: Sequence[str],
) -> pathlib.Path:
    """Write ``base/<version>`` atomically with the generator's serving signature."""
    module = GeneratorServing(generator, s, class_ids)
    signatures = {"serving_default": module.serve.get_concrete_function()}
    known = module.known_ids.numpy()
    warm = {"class_ids": known[:_WARMUP_IMAGES].astype(np.int64), "seed": np.arange(min(len(known), _WARMUP_IMAGES), dtype=np.int64)}
    warmup = _warmup_log("generator", warm)
    labels = [c for cs in generator.task_classes for c in cs]
    classes = classes_document(version, [class_ids[i] for i in labels], [class_names[i] for i in labels])
    return write_version(base, version, lambda tmp: _save(module, tmp, signatures, classes, warmup))


def models_config_text(names: Sequence[str], base_path: str = "/models") -> str:
    """A ModelServerConfig (text proto) serving ``names`` from ``<base_path>/<name>``.

    ``base_path`` is where the export folder is mounted in the server (the README's
    ``docker run -v <workdir>/export:/models``). Every version stays available
    (``all``), so clients can pin the version whose classes they know.
    """
    lines = ["model_config_list {"]
    for name in names:
        lines += [
            "  config {",
            f'    name: "{name}"',
            f'    base_path: "{base_path.rstrip("/")}/{name}"',
            '    model_platform: "tensorflow"',
            "    model_version_policy { all {} }",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def export_task(method, scenario, version: int, export_root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Export the method's classifier (and generator, if it has one) as ``version``."""
    return prepare_task_export(method, scenario, version, export_root)()


def prepare_task_export(method, scenario, version: int, export_root: pathlib.Path) -> Callable[[], dict]:
    """``export_task`` in two halves: this one takes the networks the method exports
    now; the function it returns writes them (it may run on another thread, as long as
    nothing trains those networks meanwhile: ``dgm_tf.engine.writer``)."""
    network, logits_fn = method.classifier_for_export()
    memory = method.generator_for_export()
    seen = [label for t in scenario.tasks[:version] for label in t.labels]
    class_ids = [scenario.class_order[label] for label in seen]
    class_names = [scenario.class_names[label] for label in seen]
    source_shape, model_size = scenario.source_image_shape, scenario.image_shape[0]
    order, names = list(scenario.class_order), list(scenario.class_names)

    def write() -> dict[str, pathlib.Path]:
        written = {
            "classifier": export_classifier(
                export_root / "classifier", version, network, logits_fn, source_shape,
                class_ids, class_names, model_size=model_size,
            )
        }
        if memory is not None:
            generator, s = memory
            written["generator"] = export_generator(export_root / "generator", version, generator, s, order, names)
        io_utils.atomic_write_text(export_root / "models.config", models_config_text(sorted(written)))
        return written

    return write


def exported_models(method) -> tuple[str, ...]:
    """The model names ``export_task`` writes for ``method``."""
    return MODEL_NAMES if method.generator_for_export() is not None else MODEL_NAMES[:1]
