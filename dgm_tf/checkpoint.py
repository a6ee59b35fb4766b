"""Checkpoints for exact resume: ``<workdir>/ckpt/<seq>/{state.json, arrays.npz}``.

A checkpoint is a JSON document (everything that is not an array: task, epoch, the
accuracy rows so far, the method's bookkeeping) and one ``.npz`` of arrays (weights,
optimizer slots, reserved masks, RNG states). Arrays that stay fixed for a whole task
and are large (the replay set) are stored once as ``shared/<key>.npz`` and referenced;
keys name their content (a digest), so a blob left by another attempt is never mistaken
for this one's.

Every checkpoint is built in a temporary directory and renamed into place, so a crash
while writing leaves the previous checkpoints intact and never a partial one under a
checkpoint name. The newest ``keep`` checkpoints are kept; shared blobs no kept
checkpoint refers to are deleted.

Integrity (format 2). ``state.json`` records, per shared blob, the file's size and the
sha256 of its arrays (names, dtypes, shapes and bytes: the digest of the content, not
of the zip container, so a blob written again with the same arrays has the same
digest); loading checks both. ``arrays.npz`` is checked by the CRC-32 that ``np.savez``
stores per array and ``np.load`` verifies (a sha256 of every epoch's arrays would add a
pass over them to each checkpoint for little more).
A blob is written once per task and then referenced by every checkpoint of the task,
so one damaged blob would spoil them all: before a checkpoint refers to an existing
blob, its arrays are compared with the ones in memory once per process (and whenever
the file changed since), and a blob that does not match is written again from memory,
atomically under the same name. Same name, because a key names its content: every
checkpoint referring to it wants exactly these arrays, so the rewrite repairs the older
ones too. Arrays that are not finite are never written (``io_utils.NonFiniteError``):
a checkpoint of poisoned weights would otherwise replace the good ones.

``newest()`` tells the cases apart: ``None`` when there is no checkpoint at all, the
newest usable one otherwise (``skipped`` lists the newer ones that were not, each with
its reason), and :class:`CheckpointError` when checkpoints exist but none can be used,
naming each and why. ``restore_newest(restore)`` does the same with the caller's own
restore step, so a checkpoint the current code cannot restore (a missing key or a shape
that changed without a format bump) is skipped with its reason, or refused, instead of
ending in a traceback. Format 1 checkpoints (before the digests) still load, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from dgm_tf import io_utils
from dgm_tf.config import ConfigError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "FORMAT", "RESTORE_ERRORS"]

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
SHARED_DIR = "shared"
_TMP_PREFIX = ".tmp-"
FORMAT = 2
READABLE_FORMATS = (1, 2)

# What a caller's restore step raises when a checkpoint does not fit the code that
# restores it (missing key, wrong shape, wrong type). ConfigError (a ValueError) is
# excluded in ``restore_newest``: it is the caller's verdict on the run, not on one
# checkpoint.
RESTORE_ERRORS: tuple[type[BaseException], ...] = (KeyError, IndexError, TypeError, ValueError)
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)

_ADVICE = (
    "nothing was changed; restore the damaged files from a backup, resume with the dgm_tf version "
    "that wrote them, or start the run again in a new --workdir"
)


class CheckpointError(ConfigError):
    """A checkpoint (or a checkpoint directory) that cannot be used.

    A ``ConfigError``, so ``dgm_tf.main`` prints its one-line message and exits 2.

    Attributes:
        path: The checkpoint directory (``ckpt/000007``), or the ``ckpt`` directory
            when none of its checkpoints can be used.
        reason: Why, in one line.
        failures: For the directory-level error, the error of each checkpoint, newest
            first.
    """

    def __init__(self, path: str | os.PathLike, reason: str, failures: list[CheckpointError] | None = None):
        self.path = pathlib.Path(path)
        self.reason = " ".join(str(reason).split())  # one line
        self.failures = list(failures or [])
        super().__init__(f"{self.path}: {self.reason}")


class Checkpoint:
    """A loaded checkpoint: ``state`` (dict), ``arrays`` and ``shared`` (name -> arrays).

    ``skipped``: the newer checkpoints ``newest``/``restore_newest`` passed over (their
    ``CheckpointError``s, newest first); ``restored``: what the ``restore`` step of
    ``restore_newest`` returned.
    """

    def __init__(self, path: pathlib.Path, state: dict, arrays: dict[str, np.ndarray], shared: dict[str, dict]):
        self.path, self.state, self.arrays, self.shared = path, state, arrays, shared
        self.skipped: list[CheckpointError] = []
        self.restored: Any = None


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order: the same
    for the same arrays however the file holding them was written."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        if a.size:
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _signature(path: pathlib.Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class CheckpointManager:
    """Writes and finds checkpoints in one directory."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory)
        self.keep = int(keep)
        # key -> (record, file signature) of blobs written or verified by this process.
        self._blobs: dict[str, tuple[dict, tuple[int, int, int] | None]] = {}

    def _numbered(self) -> list[pathlib.Path]:
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))

    def paths(self) -> list[pathlib.Path]:
        """The checkpoint directories, oldest first (usable or not)."""
        return self._numbered()

    # -- writing ---------------------------------------------------------------------

    def save(
        self,
        state: dict[str, Any],
        arrays: dict[str, np.ndarray],
        shared: dict[str, dict[str, np.ndarray]] | None = None,
        *,
        check_finite: bool = True,
    ) -> pathlib.Path:
        """Write a new checkpoint (atomically) and prune old ones; returns its path.

        Raises:
            io_utils.NonFiniteError: (with ``check_finite``) an array or a blob to be
                written holds NaN or an infinity; nothing is written or pruned.
        """
        shared = shared or {}
        if check_finite:
            io_utils.check_finite(arrays, what="checkpoint arrays")
        self.directory.mkdir(parents=True, exist_ok=True)
        records = {key: self._write_blob(key, blob, check_finite) for key, blob in shared.items()}
        existing = self._numbered()
        seq = int(existing[-1].name) + 1 if existing else 1
        final = self.directory / f"{seq:06d}"
        document = dict(state, format=FORMAT, shared=sorted(shared), shared_files=records)
        # A unique name: a killed process's temporary (same pid after a container
        # restart: PID 1 again) is never in the way; _prune removes it.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{seq:06d}-{os.getpid()}-", dir=self.directory))
        try:
            os.chmod(tmp, stat.S_IMODE(self.directory.stat().st_mode))  # mkdtemp's 0700 -> as ckpt/
            _write_npz(tmp / ARRAYS_FILE, arrays)
            io_utils.atomic_write_json(tmp / STATE_FILE, document)
            os.rename(tmp, final)
            io_utils.fsync_dir(self.directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return final

    def check_finite(self, arrays: dict[str, np.ndarray], shared: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """What ``save`` refuses, checked now: io_utils.NonFiniteError for a non-finite
        array, or one of a shared blob this manager has not written yet (a blob it
        wrote was checked then). For a caller that saves on another thread."""
        io_utils.check_finite(arrays, what="checkpoint arrays")
        for key, blob in (shared or {}).items():
            if key not in self._blobs:
                io_utils.check_finite(blob, what=f"shared arrays {key!r}")

    def _write_blob(self, key: str, blob: dict[str, np.ndarray], check_finite: bool) -> dict:
        """Make ``shared/<key>.npz`` hold ``blob``; returns its record (bytes, sha256)."""
        shared_dir = self.directory / SHARED_DIR
        target = shared_dir / f"{key}.npz"
        cached = self._blobs.get(key)
        if cached is not None and cached[1] is not None and _signature(target) == cached[1]:
            return cached[0]  # written or verified by this process, unchanged since
        if check_finite:
            io_utils.check_finite(blob, what=f"shared arrays {key!r}")
        digest = content_digest(blob)
        if target.exists():
            try:
                matches = content_digest(_load_npz(target)) == digest
            except _READ_ERRORS:
                matches = False
            if matches:
                return self._remember(key, target, digest)
            logging.warning(
                "shared blob %s does not hold the arrays its key names (damaged, or left by another run); "
                "writing it again", target,
            )
        shared_dir.mkdir(exist_ok=True)
        tmp = shared_dir / f"{_TMP_PREFIX}{key}-{os.getpid()}.npz"
        try:
            _write_npz(tmp, blob)
            os.replace(tmp, target)
            io_utils.fsync_dir(shared_dir)
        finally:
            if tmp.exists():
                tmp.unlink()
        return self._remember(key, target, digest)

    def _remember(self, key: str, target: pathlib.Path, digest: str) -> dict:
        signature = _signature(target)
        record = {"bytes": signature[0] if signature else None, "sha256": digest}
        self._blobs[key] = (record, signature)
        return record

    def _prune(self) -> None:
        numbered = self._numbered()
        for old in numbered[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        referenced = set()
        for kept in numbered[-self.keep :]:
            try:
                referenced.update(json.loads((kept / STATE_FILE).read_text()).get("shared", []))
            except (OSError, ValueError):
                pass
        shared_dir = self.directory / SHARED_DIR
        if shared_dir.is_dir():
            for blob in shared_dir.iterdir():
                if blob.suffix == ".npz" and blob.stem not in referenced:
                    blob.unlink(missing_ok=True)
        for child in self.directory.iterdir():
            if child.name.startswith(_TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------

    def load(self, path: str | os.PathLike) -> Checkpoint:
        """Load and verify one checkpoint.

        Raises:
            CheckpointError: naming the checkpoint and what is wrong (a missing or
                unreadable file, a damaged array (CRC-32), another format, a missing,
                truncated or changed shared blob).
        """
        path = pathlib.Path(path)

        def fail(reason: str):
            raise CheckpointError(path, reason)

        try:
            state = json.loads((path / STATE_FILE).read_text())
        except FileNotFoundError:
            fail(f"{STATE_FILE} is missing")
        except (OSError, ValueError) as e:
            fail(f"{STATE_FILE} is unreadable ({_short(e)})")
        if not isinstance(state, dict):
            fail(f"{STATE_FILE} does not hold a checkpoint document")
        fmt = state.get("format")
        if fmt not in READABLE_FORMATS:
            fail(
                f"written in checkpoint format {fmt} by another dgm_tf version (this one reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))})"
            )
        try:
            arrays = _load_npz(path / ARRAYS_FILE)
        except FileNotFoundError:
            fail(f"{ARRAYS_FILE} is missing")
        except _READ_ERRORS as e:
            fail(f"{ARRAYS_FILE} is unreadable ({_short(e)})")
        records = state.get("shared_files", {}) if fmt >= 2 else {}
        shared = {}
        for key in state.get("shared", []):
            shared[key] = self._load_blob(path, key, records.get(key) if fmt >= 2 else None, fmt)
        return Checkpoint(path, state, arrays, shared)

    def _load_blob(self, path: pathlib.Path, key: str, record: dict | None, fmt: int) -> dict[str, np.ndarray]:
        target = self.directory / SHARED_DIR / f"{key}.npz"
        name = f"shared blob {SHARED_DIR}/{key}.npz"
        if fmt >= 2 and record is None:
            raise CheckpointError(path, f"{name} has no recorded size and digest")
        if not target.is_file():
            raise CheckpointError(path, f"{name} is missing")
        if record is not None:
            size = target.stat().st_size
            if size != record["bytes"]:
                raise CheckpointError(path, f"{name} has {size} bytes, {record['bytes']} were written")
        try:
            blob = _load_npz(target)
        except _READ_ERRORS as e:
            raise CheckpointError(path, f"{name} is unreadable ({_short(e)})") from None
        if record is not None:
            digest = content_digest(blob)
            if digest != record["sha256"]:
                raise CheckpointError(
                    path, f"{name} is corrupt: its arrays' sha256 is {digest[:16]}..., {record['sha256'][:16]}... "
                    "was written",
                )
            self._blobs[key] = (record, _signature(target))  # verified: a save may refer to it
        return blob

    def restore_newest(
        self,
        restore: Callable[[Checkpoint], Any] | None = None,
        *,
        errors: tuple[type[BaseException], ...] = RESTORE_ERRORS,
    ) -> Checkpoint | None:
        """The newest checkpoint that loads and that ``restore`` accepts.

        Checkpoints are tried newest first. One that does not load, or whose
        ``restore(checkpoint)`` raises one of ``errors``, is skipped with a warning
        naming it and why (a ``ConfigError`` from ``restore`` is passed through: it is
        the caller's verdict on the run). ``restore`` must rebuild its state from
        scratch, since it may run on several checkpoints; its return value is the
        result's ``restored``, the skipped checkpoints' errors its ``skipped``.

        Returns:
            The checkpoint, or None if the directory holds no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none can be used; the message
                names each with its reason, and says what to do, in one line.
        """
        failures: list[CheckpointError] = []
        for path in reversed(self._numbered()):
            try:
                checkpoint = self.load(path)
                if restore is not None:
                    try:
                        checkpoint.restored = restore(checkpoint)
                    except ConfigError:
                        raise
                    except errors as e:
                        raise CheckpointError(path, f"cannot be restored by this version ({_short(e)})") from None
            except CheckpointError as e:
                logging.warning("checkpoint %s cannot be used: %s", path, e.reason)
                failures.append(e)
                continue
            if failures:
                logging.warning(
                    "resuming from %s, the newest usable checkpoint; skipped: %s", path,
                    "; ".join(f"{f.path.name} ({f.reason})" for f in failures),
                )
            checkpoint.skipped = failures
            return checkpoint
        if not failures:
            return None
        listing = "; ".join(f"{f.path.name}: {f.reason}" for f in failures)
        raise CheckpointError(
            self.directory,
            f"none of its {len(failures)} checkpoints can be used ({listing}); {_ADVICE}",
            failures,
        )

    def newest(self) -> Checkpoint | None:
        """The newest checkpoint that loads; None if there is none at all.

        Raises:
            CheckpointError: checkpoints exist but none loads (see ``restore_newest``).
        """
        return self.restore_newest()

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads completely (older ones if the newest is
        damaged), or None, also when checkpoints exist but none loads: use ``newest``
        to tell the two apart."""
        try:
            return self.newest()
        except CheckpointError:
            return None
