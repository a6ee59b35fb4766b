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
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import zipfile
from typing import Any

import numpy as np
from absl import logging

from dgm_tf import io_utils

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
SHARED_DIR = "shared"
_TMP_PREFIX = ".tmp-"
FORMAT = 1


class Checkpoint:
    """A loaded checkpoint: ``state`` (dict), ``arrays`` and ``shared`` (name -> arrays)."""

    def __init__(self, path: pathlib.Path, state: dict, arrays: dict[str, np.ndarray], shared: dict[str, dict]):
        self.path, self.state, self.arrays, self.shared = path, state, arrays, shared


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    """Writes and finds checkpoints in one directory."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory)
        self.keep = int(keep)

    def _numbered(self) -> list[pathlib.Path]:
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))

    def save(
        self,
        state: dict[str, Any],
        arrays: dict[str, np.ndarray],
        shared: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> pathlib.Path:
        """Write a new checkpoint (atomically) and prune old ones; returns its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        shared_dir = self.directory / SHARED_DIR
        shared = shared or {}
        for key, blob in shared.items():
            target = shared_dir / f"{key}.npz"
            if not target.exists():  # fixed for its task: written once
                shared_dir.mkdir(exist_ok=True)
                tmp = shared_dir / f"{_TMP_PREFIX}{key}-{os.getpid()}.npz"
                try:
                    _write_npz(tmp, blob)
                    os.replace(tmp, target)
                    io_utils.fsync_dir(shared_dir)
                finally:
                    if tmp.exists():
                        tmp.unlink()
        existing = self._numbered()
        seq = int(existing[-1].name) + 1 if existing else 1
        final = self.directory / f"{seq:06d}"
        tmp = self.directory / f"{_TMP_PREFIX}{seq:06d}-{os.getpid()}"
        document = dict(state, format=FORMAT, shared=sorted(shared))
        try:
            tmp.mkdir()
            _write_npz(tmp / ARRAYS_FILE, arrays)
            io_utils.atomic_write_json(tmp / STATE_FILE, document)
            os.rename(tmp, final)
            io_utils.fsync_dir(self.directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return final

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

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads completely (older ones if the newest is
        damaged), or None."""
        for path in reversed(self._numbered()):
            try:
                state = json.loads((path / STATE_FILE).read_text())
                if state.get("format") != FORMAT:
                    raise ValueError(f"format {state.get('format')} (expected {FORMAT})")
                arrays = _load_npz(path / ARRAYS_FILE)
                shared = {key: _load_npz(self.directory / SHARED_DIR / f"{key}.npz") for key in state["shared"]}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                logging.warning("checkpoint %s is unreadable (%s); trying an older one", path, e)
                continue
            return Checkpoint(path, state, arrays, shared)
        return None
