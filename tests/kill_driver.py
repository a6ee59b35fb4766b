"""Runs dgm_tf.main and SIGKILLs itself at a chosen point (for the resume tests).

    python tests/kill_driver.py <point> <main flags...>

Points: ``batch:T:E:B`` (before batch B of epoch E of task T, all 0-based; DGM methods),
``nispa_batch:T:E:B`` (the same for NISPA, E counted across its phases),
``dynamos_batch:T:E:B`` (the same for Dynamos),
``begin_task:T``, ``export:V`` (export version V written, not yet renamed into place),
``checkpoint:N`` (the N-th checkpoint's arrays written, not yet renamed into place).
``enospc:NAME:N`` does not kill: the N-th atomic write of a file called NAME fails as
if the disk were full. A point inside training (``*batch``, ``begin_task``) first lets a
checkpoint being written beside training finish (``die(settle=True)``).
"""

import os
import pathlib
import signal
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import errno  # noqa: E402

from dgm_tf import checkpoint, export, io_utils, main  # noqa: E402
from dgm_tf.methods import classifier_base, dgm, dynamos, nispa  # noqa: E402
from tests.dgm_helpers import train_task_with_hook  # noqa: E402


def die(settle=False):
    """SIGKILL this process. ``settle``: first let the checkpoint being written beside
    training finish (dgm_tf/engine/writer.py; at most 60 s), so that a point inside
    training means "killed with every checkpoint taken so far on disk"; the
    ``checkpoint:N`` point kills inside a write instead."""
    deadline = time.monotonic() + 60
    while settle and time.monotonic() < deadline and any(
        t.name.startswith("dgm_tf-writer-checkpoint") and t.is_alive() for t in threading.enumerate()
    ):
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def settle_and_die():
    die(settle=True)


def install(point: str) -> None:
    kind, *args = point.split(":")
    nums = [int(a) for a in args] if kind != "enospc" else []
    if kind == "batch":
        original = dgm.MaskScaleSchedule.on_train_batch_begin

        def on_batch(self, batch, logs=None):
            if (self.trainer.task, self._epoch, batch) == tuple(nums):
                settle_and_die()
            return original(self, batch, logs)

        dgm.MaskScaleSchedule.on_train_batch_begin = on_batch
    elif kind == "nispa_batch":

        def on_nispa_batch(self, batch, logs=None):
            if (self.task.index, self.epoch, batch) == tuple(nums):
                settle_and_die()

        nispa.NispaPhaseCallback.on_train_batch_begin = on_nispa_batch
    elif kind == "dynamos_batch":
        dynamos.Dynamos.train_task = train_task_with_hook(dynamos.Dynamos.train_task, nums, settle_and_die)
    elif kind == "begin_task":
        # Every method's begin_task (DGMw/DGMa share DGM's; the comparison methods theirs).
        for cls in (dgm.DGM, classifier_base.ClassifierBaseline, nispa.NISPA):
            original_begin = cls.begin_task

            def begin(self, task, _original=original_begin):
                if task.index == nums[0]:
                    settle_and_die()
                return _original(self, task)

            cls.begin_task = begin
    elif kind == "export":
        original_save = export._save

        def save(module, directory, *a, **k):
            original_save(module, directory, *a, **k)
            if directory.name.startswith(f".tmp-{nums[0]}-"):
                die()

        export._save = save
    elif kind == "checkpoint":
        original_write = checkpoint._write_npz
        calls = {"n": 0}

        def write(path, arrays):
            original_write(path, arrays)
            if path.name == checkpoint.ARRAYS_FILE:
                calls["n"] += 1
                if calls["n"] == nums[0]:
                    die()

        checkpoint._write_npz = write
    elif kind == "enospc":
        name, n = args[0], int(args[1])
        original_atomic = io_utils.atomic_write_bytes
        calls = {"n": 0}

        def atomic(path, data):
            if pathlib.Path(path).name == name:
                calls["n"] += 1
                if calls["n"] == n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original_atomic(path, data)

        io_utils.atomic_write_bytes = atomic
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["dgm_tf.main"] + sys.argv[2:]
    main.run()
