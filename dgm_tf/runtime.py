"""Process-wide TensorFlow runtime choices that must be made before TensorFlow loads.

Only entry points call ``prefer_onednn`` (``dgm_tf.main``, ``tools/benchmark.py``, the
test suite's conftest); importing the library changes nothing.

oneDNN: TensorFlow's Linux x86 build turns its oneDNN kernels on by default only on CPUs
with AVX-512 VNNI/BF16 or AMX. On the AVX2-only CPU this project is measured on, turning
them on made a forward+backward of the DGM discriminator (64 images, ndf 32) take 25.7 ms
instead of 36.7 ms and the gradient penalty's double backward 52.0 ms instead of 79.3 ms,
level with PyTorch's 24.9 / 52.7 ms on the same machine (README, Performance). The env
variable is read once, when TensorFlow loads, so it cannot be a Config field.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import MutableMapping

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask for TensorFlow's oneDNN kernels unless the user set ``TF_ENABLE_ONEDNN_OPTS``.

    Returns True when the choice can still take effect (TensorFlow not yet imported in
    this process); a user's own setting, 0 or 1, is always kept.
    """
    environ = os.environ if environ is None else environ
    environ.setdefault(ONEDNN_ENV, "1")
    return "tensorflow" not in sys.modules


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs its oneDNN kernels (None: unknown)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # private, hence the guard
    except ImportError:  # pragma: no cover - depends on the TensorFlow build
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def describe() -> dict:
    """Versions and kernel choice recorded with every run (results.json ``runtime``)."""
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "onednn": onednn_enabled()}


# TensorFlow's own start-up lines: C++ log records ("I1201 00:52:26.789 5217 port.cc:153] ..."),
# absl's banner for records written before its logging is initialised, and continuation
# lines of a multi-line record (they start with no prefix).
_CPP_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# ERROR records that are not errors: every CUDA-enabled build on a machine without a GPU
# driver logs this one when it looks for devices.
_HARMLESS_ERRORS = ("failed call to cuInit",)


def filter_startup_log(text: str) -> str:
    """What of TensorFlow's start-up stderr a user should see: its WARNING and ERROR
    records (with their continuation lines) and anything that is not a log record, less
    INFO records, absl's pre-initialisation banner and ``_HARMLESS_ERRORS``."""
    kept, keep_record = [], True
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == _ABSL_BANNER:
            keep_record = False
            continue
        if _CPP_RECORD.match(line):
            keep_record = line[0] != "I" and not any(h in line for h in _HARMLESS_ERRORS)
        if keep_record:
            kept.append(line)
    return "".join(kept)


def import_tensorflow(verbose: bool = False, discover_devices: bool = True) -> None:
    """Import TensorFlow and find its devices, showing only what a user needs to see.

    TensorFlow prints a dozen internal lines at start-up whatever ``TF_CPP_MIN_LOG_LEVEL``
    says (records logged before absl's C++ logging is initialised ignore it), one of them
    an ERROR about ``cuInit`` on every machine without a GPU; the Python side adds INFO
    lines on every SavedModel write. Unless ``verbose`` (``--verbosity=1`` or more) or the
    user set ``TF_CPP_MIN_LOG_LEVEL``: C++ records below ERROR are off, stderr is captured
    while TensorFlow loads and initialises its devices and replayed through
    ``filter_startup_log``, and the ``tensorflow`` Python logger shows WARNING and above.
    An entry point calls this before anything else imports TensorFlow.

    ``discover_devices=False`` only imports TensorFlow: a process that will run
    ``MultiWorkerMirroredStrategy`` must create it before its devices are initialised
    (TensorFlow configures the collectives at program start-up).
    """
    if verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        import tensorflow as tf

        if discover_devices:
            tf.config.list_logical_devices()
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    captured = tempfile.TemporaryFile(mode="w+b")
    try:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            if discover_devices:
                tf.config.list_logical_devices()  # device discovery logs the cuInit error
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace")
        captured.close()
        sys.stderr.write(filter_startup_log(text))
        sys.stderr.flush()
    import logging as py_logging

    py_logging.getLogger("tensorflow").setLevel(py_logging.WARNING)
