"""Exports and checkpoints written while training goes on (issue 23).

Checkpoints: the engine takes each one's snapshot in the training thread when the epoch
(or task) ends: the arrays are copies, the JSON state is encoded (and so checked) and
decoded into a copy, and a non-finite array is refused there, before anything is
written. A ``BackgroundWriter`` of its own then writes it (``CheckpointManager.save``:
atomic, in order, one at a time), while the next epoch (or task) trains. A write that
fails is raised at the next checkpoint or at the end of the run, and the engine waits
for the pending one before it stops for any reason, so the newest checkpoint taken is
on disk. A process killed while one is written resumes
from the one before it (one epoch more to train). On session 15's 2-core Zen 4 EPYC a
checkpoint took about 55 ms of each epoch at 10 tasks (11.4 s of a 20-epoch run), most of
it the write and its fsyncs (file, directories), which weigh more on a slower or network
disk.

Exports:

A SavedModel export is all CPU (tracing the serving signatures, then serializing:
1-4 s per task on session 12's 2-core EPYC, growing with the networks; README, Performance) and reads nothing but
the networks it exports. A method whose ``begin_task`` builds new network objects
(``ContinualMethod.fresh_networks_each_task``) never touches the exported ones again,
so the engine hands the export of task t to ``BackgroundWriter`` and goes on with task
t+1 while it is written.

The write starts only once task t+1's first training step is done (``release``, from
``WriterCallback``). Started at once, it ran beside begin_task's replay generation and
the replay evaluation, which use both cores themselves: on a 2-core EPYC, 10-task runs
moved 19 s of export into begin_task (about +10 s) and evaluation (about +3 s) and ended
no faster (README, Performance). The steps after the first leave room an export can use.

Order and durability are kept by where the engine waits (``wait``):

* before the next export (one write at a time: versions appear in order);
* at the end of every epoch, before an epoch checkpoint can be written: a mid-task
  checkpoint of task t+1 therefore always comes after version t+1 is complete (a
  wait releases a write not yet started, so it never waits for nothing);
* before the run ends, and when it stops on an error.

The task-end checkpoint of task t does not wait, so a crash can leave it without
version t+1; resuming from it writes the missing version again from the restored
networks (``engine.loop._export_missing``), which are those of the export.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import keras
from absl import logging


class BackgroundWriter:
    """Runs one write at a time on a thread; ``wait`` joins it and re-raises its error."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self._go = threading.Event()

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def submit(self, what: str, write: Callable[[], None], deferred: bool = False) -> None:
        """Wait for the previous write, then run ``write()`` on a thread: at once, or
        with ``deferred`` once ``release`` (or ``wait``) is called."""
        self.wait()
        self._what, self._error = what, None
        self._go = threading.Event()
        if not deferred:
            self._go.set()
        go = self._go

        def run():
            go.wait()
            try:
                write()
            except BaseException as e:  # noqa: BLE001 (handed to the thread that waits)
                self._error = e

        self._thread = threading.Thread(target=run, name=f"dgm_tf-writer-{what}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let a deferred write start (no effect otherwise)."""
        self._go.set()

    def wait(self) -> float:
        """Block until the pending write (if any) is done, releasing it first; seconds
        waited. Re-raises the write's exception in the waiting thread."""
        if self._thread is None:
            return 0.0
        self.release()
        start = time.perf_counter()
        self._thread.join()
        self._thread = None
        waited = time.perf_counter() - start
        if waited > 0.05:
            logging.debug("waited %.1fs for the %s", waited, self._what)
        error, self._error = self._error, None
        if error is not None:
            raise error
        return waited

    def drain(self) -> None:
        """``wait`` for a caller already stopping on another error: the write is finished
        (or failed) before the process goes on, and its own error is logged, not raised."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 (the error being raised is the one to report)
            logging.warning("the %s failed too: %s", self._what, e)


class WriterCallback(keras.callbacks.Callback):
    """Releases ``writer``'s deferred write after each training step (the first one
    counts; later calls cost nothing) and waits for it at the end of every epoch
    (placed before the epoch checkpoint among the callbacks)."""

    def __init__(self, writer: BackgroundWriter):
        super().__init__()
        self.writer = writer

    def on_train_batch_end(self, batch, logs=None):
        self.writer.release()

    def on_epoch_end(self, epoch, logs=None):
        self.writer.wait()
