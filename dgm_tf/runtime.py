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
import sys
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
