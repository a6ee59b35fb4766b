r"""Send images to the exported classifier on TF Serving (REST or gRPC) and print predictions.

    # REST (port 8501), images from files, resized/converted to what the model takes:
    python tools/serving_request.py --export_dir=runs/quickstart/export shoe.png bag.jpg
    # gRPC (port 8500), five test images of the embedded dataset:
    python tools/serving_request.py --export_dir=runs/quickstart/export --protocol=grpc --samples=5
    # Print the request instead of sending it:
    python tools/serving_request.py --export_dir=runs/quickstart/export --samples=2 --dry_run

The request is built from the export itself: the version's ``serving_default``
signature gives the input shape (images are resized and converted to it) and
``classes.json`` the class names printed next to the predictions. This tool imports only
TensorFlow, numpy and tensorflow-serving-api, except ``--samples``, which reads the
embedded dataset through dgm_tf.
"""

from __future__ import annotations

import json
import pathlib
import sys
import urllib.error
import urllib.request

import numpy as np
from absl import app, flags

flags.DEFINE_string("export_dir", None, "The run's export folder (holds classifier/<version>/).")
flags.DEFINE_string("model_name", "classifier", "Model name on the server (models.config).")
flags.DEFINE_integer("version", 0, "Model version to query (0: the newest in --export_dir).")
flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (JSON) or gRPC (PredictRequest).")
flags.DEFINE_string("host", "127.0.0.1", "Server host.")
flags.DEFINE_integer("port", 0, "Server port (0: 8501 for REST, 8500 for gRPC).")
flags.DEFINE_integer("samples", 0, "Use this many test images of the embedded dataset instead of files.")
flags.DEFINE_boolean("dry_run", False, "Print the request (REST body or PredictRequest text) and exit.")
flags.DEFINE_float("timeout", 30.0, "Seconds to wait for the server.")

FLAGS = flags.FLAGS


class RequestError(Exception):
    """A user-facing problem (bad file, missing export, server error)."""


def newest_version(base: pathlib.Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    if not versions:
        raise RequestError(f"{base}: no exported version (expected numbered SavedModel folders)")
    return max(versions)


def signature_input(version_dir: pathlib.Path) -> tuple[str, tuple[int, ...], str]:
    """(input name, shape without the batch, dtype name) of ``serving_default``."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    (name, spec), = fn.structured_input_signature[1].items()
    return name, tuple(int(d) for d in spec.shape[1:]), spec.dtype.name


def load_images(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """Decode image files and bring them to ``shape`` (H, W, C) as uint8."""
    import tensorflow as tf

    h, w, c = shape
    out = []
    for path in paths:
        try:
            data = tf.io.read_file(path)
            img = tf.io.decode_image(data, expand_animations=False)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            raise RequestError(f"{path}: cannot read image ({e.message.splitlines()[0]})") from None
        if img.shape[-1] in (2, 4):  # drop alpha
            img = img[..., :-1]
        if img.shape[-1] == 3 and c == 1:
            img = tf.image.rgb_to_grayscale(img)
        elif img.shape[-1] == 1 and c == 3:
            img = tf.image.grayscale_to_rgb(img)
        if tuple(img.shape[:2]) != (h, w):
            img = tf.image.resize(img, (h, w), method="bilinear", antialias=True)
        out.append(np.clip(np.round(np.asarray(img, np.float32)), 0, 255).astype(np.uint8))
    return np.stack(out)


def sample_images(n: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """``n`` test images of the embedded dataset, one class after the other."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from dgm_tf.data import load_dataset

    raw = load_dataset("embedded")
    if raw.image_shape != shape:
        raise RequestError(f"--samples: the embedded images are {raw.image_shape}, the model takes {shape}")
    classes = np.unique(raw.y_test)
    available = min(int(np.sum(raw.y_test == c)) for c in classes) * len(classes)
    if n > available:
        raise RequestError(f"--samples: at most {available} test images are available, asked for {n}")
    idx = [int(np.flatnonzero(raw.y_test == classes[k % len(classes)])[k // len(classes)]) for k in range(n)]
    return raw.x_test[idx], [f"test image of {raw.class_names[raw.y_test[i]]!r}" for i in idx]


def rest_body(images: np.ndarray, input_name: str) -> dict:
    """The REST predict body in the row ("instances") format."""
    return {"signature_name": "serving_default", "instances": [{input_name: img.tolist()} for img in images]}


def grpc_request(images: np.ndarray, input_name: str, model_name: str, version: int):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = "serving_default"
    if version:
        request.model_spec.version.value = int(version)
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, dtype=tf.uint8))
    return request


def send_rest(body: dict, host: str, port: int, model_name: str, version: int, timeout: float) -> list[dict]:
    path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version else "") + ":predict"
    url = f"http://{host}:{port}{path}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RequestError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RequestError(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None
    if "predictions" not in reply:
        raise RequestError(f"{url}: unexpected reply {str(reply)[:300]}")
    return reply["predictions"]


def send_grpc(request, host: str, port: int, timeout: float) -> list[dict]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            reply = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            raise RequestError(f"{host}:{port}: gRPC {e.code().name}: {e.details()}") from None
    out = {k: tf.make_ndarray(v) for k, v in reply.outputs.items()}
    n = len(out["class_ids"])
    return [{k: (v[i].decode() if isinstance(v[i], bytes) else v[i].tolist()) for k, v in out.items()} for i in range(n)]


def format_predictions(predictions: list[dict], labels: list[str], classes: list[dict]) -> str:
    lines = []
    for label, p in zip(labels, predictions):
        probs = np.asarray(p["probabilities"], np.float64)
        best = int(np.argmax(probs))
        name = p.get("class_names") or classes[best]["name"]
        name = name.decode() if isinstance(name, bytes) else name
        lines.append(f"{label}: {name} (class id {p['class_ids']}, p={probs[best]:.3f})")
    return "\n".join(lines)


def main(argv):
    paths = argv[1:]
    try:
        if not FLAGS.export_dir:
            raise RequestError("--export_dir: required (the run's export folder)")
        base = pathlib.Path(FLAGS.export_dir) / FLAGS.model_name
        version = FLAGS.version or newest_version(base)
        version_dir = base / str(version)
        if not version_dir.is_dir():
            raise RequestError(f"{version_dir}: no such exported version")
        classes = json.loads((version_dir / "classes.json").read_text())["classes"]
        input_name, shape, dtype = signature_input(version_dir)
        if dtype != "uint8" or len(shape) != 3:
            raise RequestError(f"{version_dir}: serving_default takes {dtype} {shape}; expected uint8 images")
        if FLAGS.samples and paths:
            raise RequestError("give image files or --samples, not both")
        if FLAGS.samples:
            images, labels = sample_images(FLAGS.samples, shape)
        elif paths:
            images, labels = load_images(paths, shape), paths
        else:
            raise RequestError("no images: give image files or --samples=N")
        port = FLAGS.port or (8501 if FLAGS.protocol == "rest" else 8500)
        if FLAGS.protocol == "rest":
            body = rest_body(images, input_name)
            if FLAGS.dry_run:
                print(json.dumps(body))
                return 0
            # Query the version whose signature and classes.json were read, not the
            # server's newest, which may be another one.
            predictions = send_rest(body, FLAGS.host, port, FLAGS.model_name, version, FLAGS.timeout)
        else:
            request = grpc_request(images, input_name, FLAGS.model_name, version)
            if FLAGS.dry_run:
                from google.protobuf import text_format

                print(text_format.MessageToString(request))
                return 0
            predictions = send_grpc(request, FLAGS.host, port, FLAGS.timeout)
        print(format_predictions(predictions, labels, classes))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
