"""A run's work is never lost (issue 18): checkpoints that say why they cannot be used,
verified shared blobs, no non-finite checkpoint, an exclusive workdir lock, scenario
fingerprints, bounded reads of hostile data files, and non-finite image grids.

The tests above the "engine integration" line exercise the library pieces directly
(small synthetic files under tmp_path, a few seconds in total). The ones below it drive
``engine.run_experiment`` and need the engine to use those pieces.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from dgm_tf import io_utils
from dgm_tf.checkpoint import CheckpointError, CheckpointManager
from dgm_tf.config import ConfigError
from dgm_tf.data import (
    DataError, RawDataset, fingerprint_differences, load_dataset, make_scenario, scenario_fingerprint,
)
from dgm_tf.data import sources
from dgm_tf.data.files import load_npz

REPO = pathlib.Path(__file__).resolve().parents[1]


def snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# ============================================================== checkpoints


def _save_three(manager, blob_key="replay_task_000_abc"):
    blob = {"x_0": np.arange(12, dtype=np.float32).reshape(3, 4), "y_0": np.arange(3, dtype=np.int32)}
    for i in range(3):
        manager.save({"i": i}, {"w": np.full(4, float(i), np.float32)}, shared={blob_key: blob})
    return blob


def test_no_checkpoint_is_none_but_unusable_ones_are_an_error_naming_each(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep=3)
    assert manager.newest() is None  # nothing at all: a resume may start the run
    _save_three(manager)
    (tmp_path / "ckpt" / "000003" / "arrays.npz").write_bytes(b"garbage")
    state = json.loads((tmp_path / "ckpt" / "000002" / "state.json").read_text())
    (tmp_path / "ckpt" / "000002" / "state.json").write_text(json.dumps(dict(state, format=99)))
    (tmp_path / "ckpt" / "000001" / "state.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        manager.newest()
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message  # main: one line, exit 2
    assert "000003" in message and "arrays.npz" in message
    assert "000002" in message and "format 99" in message
    assert "000001" in message and "state.json" in message
    assert "new --workdir" in message  # what to do
    assert [f.path.name for f in err.value.failures] == ["000003", "000002", "000001"]
    assert manager.latest() is None  # the old API keeps its meaning
    assert snapshot(tmp_path) == before  # looking changes nothing


def test_newest_falls_back_over_a_damaged_checkpoint_and_says_which(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    _save_three(manager)
    (tmp_path / "000003" / "arrays.npz").write_bytes(b"garbage")
    found = manager.newest()
    assert found.state["i"] == 1 and found.path.name == "000002"
    assert [f.path.name for f in found.skipped] == ["000003"]


def test_shared_blob_records_size_and_digest_and_a_changed_blob_is_refused(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    blob = _save_three(manager)
    blob_path = tmp_path / "shared" / "replay_task_000_abc.npz"
    record = json.loads((tmp_path / "000003" / "state.json").read_text())["shared_files"]["replay_task_000_abc"]
    assert record["bytes"] == blob_path.stat().st_size
    assert len(record["sha256"]) == 64
    loaded = manager.newest()
    np.testing.assert_array_equal(loaded.shared["replay_task_000_abc"]["x_0"], blob["x_0"])
    # A valid npz with other content under the blob's name (every checkpoint refers to it).
    with open(blob_path, "wb") as f:
        np.savez(f, x_0=blob["x_0"] + 1, y_0=blob["y_0"])
    with pytest.raises(CheckpointError) as err:
        manager.newest()
    assert "replay_task_000_abc" in str(err.value) and "sha256" in str(err.value)
    blob_path.write_bytes(blob_path.read_bytes()[:-7])  # truncated: the size says so
    with pytest.raises(CheckpointError, match="bytes"):
        manager.newest()
    blob_path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        manager.newest()


def test_a_pre_existing_blob_that_does_not_match_is_written_again(tmp_path):
    blob = _save_three(CheckpointManager(tmp_path, keep=3))
    blob_path = tmp_path / "shared" / "replay_task_000_abc.npz"
    with open(blob_path, "wb") as f:  # damaged after it was written
        np.savez(f, x_0=np.zeros((3, 4), np.float32), y_0=blob["y_0"])
    # A new process (a resume) saves with the same key: the blob's content is checked,
    # not trusted because the file exists, and written again from the arrays in memory.
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({"i": 3}, {"w": np.zeros(4, np.float32)}, shared={"replay_task_000_abc": blob})
    loaded = manager.newest()
    assert loaded.state["i"] == 3
    np.testing.assert_array_equal(loaded.shared["replay_task_000_abc"]["x_0"], blob["x_0"])
    # Keys name their content, so the rewrite repairs the older checkpoints too.
    assert manager.load(tmp_path / "000003").state["i"] == 2


def test_stale_temporary_of_a_killed_process_with_the_same_pid_is_no_obstacle(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save({"i": 0}, {"w": np.zeros(2)})
    stale = tmp_path / f".tmp-000002-{os.getpid()}"  # PID 1 again in a restarted container
    stale.mkdir()
    (stale / "arrays.npz").write_bytes(b"half")
    manager.save({"i": 1}, {"w": np.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001", "000002"]
    assert manager.newest().state["i"] == 1


def test_restore_failure_falls_back_with_the_reason_or_is_refused(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    _save_three(manager)

    def restore(checkpoint):  # a schema change: the newest lacks a key this version needs
        if checkpoint.state["i"] == 2:
            raise KeyError("generator/0007")
        return checkpoint.state["i"]

    found = manager.restore_newest(restore)
    assert found.state["i"] == 1 and found.restored == 1
    assert "generator/0007" in found.skipped[0].reason and found.skipped[0].path.name == "000003"

    def shape_mismatch(checkpoint):
        raise ValueError("shape (4, 4) does not match (4, 8)")

    with pytest.raises(CheckpointError) as err:
        manager.restore_newest(shape_mismatch)
    assert all(name in str(err.value) for name in ("000001", "000002", "000003", "(4, 8)"))

    def user_error(checkpoint):  # a ConfigError is the caller's verdict: passed through
        raise ConfigError("--resume: the data changed")

    with pytest.raises(ConfigError, match="data changed") as err:
        manager.restore_newest(user_error)
    assert not isinstance(err.value, CheckpointError)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_arrays_are_never_checkpointed_and_the_good_one_stays(tmp_path, bad):
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save({"epoch": 1}, {"generator/0000": np.ones(3, np.float32)})
    before = snapshot(tmp_path)
    poisoned = {"generator/0000": np.ones(3, np.float32), "generator/0001": np.array([1.0, bad], np.float32)}
    with pytest.raises(io_utils.NonFiniteError, match="generator/0001"):
        manager.save({"epoch": 2}, poisoned)
    assert snapshot(tmp_path) == before  # nothing written, nothing pruned
    assert manager.newest().state["epoch"] == 1


def test_checkpoints_of_the_previous_format_still_load(tmp_path):
    """FORMAT 1 (no digests) was written by the previous release: a run upgraded
    mid-way still resumes; its blobs simply are not verified."""
    (tmp_path / "shared").mkdir(parents=True)
    np.savez(tmp_path / "shared" / "k.npz", x=np.arange(3))
    (tmp_path / "000001").mkdir()
    np.savez(tmp_path / "000001" / "arrays.npz", w=np.ones(2))
    (tmp_path / "000001" / "state.json").write_text(json.dumps({"i": 7, "format": 1, "shared": ["k"]}))
    found = CheckpointManager(tmp_path).newest()
    assert found.state["i"] == 7 and found.shared["k"]["x"].tolist() == [0, 1, 2]


def test_a_flipped_bit_in_the_arrays_is_caught_by_their_crc(tmp_path):
    """arrays.npz has no digest of its own: np.savez stores a CRC-32 per array and
    np.load checks it, which this pins."""
    manager = CheckpointManager(tmp_path, keep=2)
    w = np.arange(256, dtype=np.float32)
    manager.save({"i": 0}, {"w": w})
    path = tmp_path / "000001" / "arrays.npz"
    data = bytearray(path.read_bytes())
    data[data.find(w[100:101].tobytes())] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"arrays.npz is unreadable .*CRC"):
        manager.newest()


# ============================================================== workdir lock

_HOLDER = """
import sys, time
from dgm_tf import workdir
with workdir.lock_workdir(sys.argv[1], fresh=False):
    print("locked", flush=True)
    sys.stdin.read()
"""

_CONTENDER = """
import sys, time
from dgm_tf import workdir
start = time.monotonic()
try:
    with workdir.lock_workdir(sys.argv[1], fresh=sys.argv[2] == "fresh"):
        print("acquired", flush=True)
except workdir.WorkdirError as e:
    print(f"{time.monotonic() - start:.3f} {e}", flush=True)
    sys.exit(2)
"""


def _python(code, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def test_a_second_process_is_refused_at_once_naming_the_holder_and_changes_nothing(tmp_path):
    from dgm_tf import workdir

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "flags.txt").write_text("--epochs=2\n")
    with workdir.lock_workdir(wd, fresh=False):
        holder = json.loads((wd / workdir.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        before = snapshot(wd)
        for mode in ("resume", "fresh"):
            proc = _python(_CONTENDER, wd, mode)
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                proc.kill()  # if it waited for the lock
                proc.wait()
            assert proc.returncode == 2, (out, err)
            seconds, message = out.split(" ", 1)
            assert float(seconds) < 1.0  # at once, no waiting for the lock
            if mode == "resume":
                assert f"pid {os.getpid()}" in message and "in use" in message
            else:  # a fresh start sees the files first
                assert "not empty" in message
            assert snapshot(wd) == before
    assert (wd / workdir.LOCK_FILE).read_text() == ""  # released: holder cleared


def test_the_lock_dies_with_its_holder(tmp_path):
    from dgm_tf import workdir

    wd = tmp_path / "wd"
    wd.mkdir()
    holder = _python(_HOLDER, wd)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirError, match=f"pid {holder.pid}"):
            with workdir.lock_workdir(wd):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with workdir.lock_workdir(wd):  # the kernel dropped the killed holder's lock
        assert json.loads((wd / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_fresh_start_takes_the_lock_before_checking_emptiness(tmp_path):
    from dgm_tf import workdir

    wd = tmp_path / "new" / "wd"
    with workdir.lock_workdir(wd, fresh=True) as path:  # created, .lock is no content
        assert path == wd and sorted(p.name for p in wd.iterdir()) == [workdir.LOCK_FILE]
        # A racing fresh start that passed the emptiness check before this one wrote
        # anything is refused by the lock, not let through.
        with pytest.raises(workdir.WorkdirError, match="in use"):
            with workdir.lock_workdir(wd, fresh=True):
                pass
        (wd / "flags.txt").write_text("x")
    with pytest.raises(workdir.WorkdirError, match="not empty"):
        with workdir.lock_workdir(wd, fresh=True):
            pass
    only_lock = tmp_path / "only_lock"
    only_lock.mkdir()
    (only_lock / workdir.LOCK_FILE).write_text("")  # left by a refused start
    with workdir.lock_workdir(only_lock, fresh=True):
        pass
    with pytest.raises(workdir.WorkdirError, match="does not exist"):
        with workdir.lock_workdir(tmp_path / "absent", fresh=False):
            pass
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(workdir.WorkdirError, match="not a directory"):
        with workdir.lock_workdir(afile, fresh=True):
            pass
    with pytest.raises(workdir.WorkdirError, match="not writable"):
        with workdir.lock_workdir(afile / "wd", fresh=True):
            pass
    assert issubclass(workdir.WorkdirError, ConfigError)


def test_fresh_start_rechecks_emptiness_once_it_holds_the_lock(tmp_path, monkeypatch):
    """The race: this start finds the directory empty, then another start locks it,
    writes its flags and ends before this one locks. Under the lock the files are seen."""
    from dgm_tf import workdir

    wd = tmp_path / "wd"
    original = workdir.fcntl.flock

    def racing_flock(fd, operation):
        (wd / "flags.txt").write_text("--epochs=2\n")  # the other start, between check and lock
        return original(fd, operation)

    monkeypatch.setattr(workdir.fcntl, "flock", racing_flock)
    with pytest.raises(workdir.WorkdirError, match="not empty"):
        with workdir.lock_workdir(wd, fresh=True):
            pytest.fail("a fresh run went ahead in a directory another run had written")


def test_non_empty_fresh_workdir_is_refused_without_writing(tmp_path):
    from dgm_tf import workdir

    wd = tmp_path / "mine"
    wd.mkdir()
    (wd / "notes.txt").write_text("mine")
    with pytest.raises(workdir.WorkdirError, match="not empty"):
        with workdir.lock_workdir(wd, fresh=True):
            pass
    assert sorted(p.name for p in wd.iterdir()) == ["notes.txt"]  # no .lock left behind


# ============================================================ data fingerprint


def _raw(n_per_class=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y_train = np.repeat(np.arange(classes), n_per_class)
    y_test = np.repeat(np.arange(classes), 2)
    return RawDataset(
        name="synthetic",
        x_train=rng.integers(0, 256, (len(y_train), 28, 28, 1), dtype=np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (len(y_test), 28, 28, 1), dtype=np.uint8),
        y_test=y_test,
        class_names=tuple(f"c{i}" for i in range(classes)),
    )


def _scenario(raw, order=(0, 1, 2, 3)):
    return make_scenario(raw, class_order=order, classes_per_task=2, num_tasks=None, seed=0, image_size=8)


def test_fingerprint_is_stable_and_names_the_task_and_split_that_changed():
    raw = _raw()
    fp = scenario_fingerprint(_scenario(raw))
    assert json.loads(json.dumps(fp)) == fp  # goes into a checkpoint's state.json
    assert scenario_fingerprint(_scenario(_raw())) == fp  # same data, same fingerprint
    assert fingerprint_differences(fp, fp) == []

    x_test = raw.x_test.copy()
    x_test[np.flatnonzero(raw.y_test == 3)[0], 5, 5, 0] ^= 1  # one pixel of class 3 (task 2)
    changed = RawDataset(raw.name, raw.x_train, raw.y_train, x_test, raw.y_test, raw.class_names)
    diffs = fingerprint_differences(fp, scenario_fingerprint(_scenario(changed)))
    assert diffs == ["task 2 test split differs (images)"]

    y_train = raw.y_train.copy()
    y_train[[0, -1]] = y_train[[-1, 0]]  # an image of class 0 and one of class 3 swap labels
    relabelled = RawDataset(raw.name, raw.x_train, y_train, raw.x_test, raw.y_test, raw.class_names)
    assert fingerprint_differences(fp, scenario_fingerprint(_scenario(relabelled))) == [
        f"task {t} {split} split differs (images)" for t in (1, 2) for split in ("train", "validation")
    ]

    diffs = fingerprint_differences(fp, scenario_fingerprint(_scenario(raw, order=(1, 0, 2, 3))))
    assert diffs[0].startswith("class order differs") and "[0, 1, 2, 3]" in diffs[0]

    more = _raw(n_per_class=7)  # one more image per class reshuffles every split
    diffs = fingerprint_differences(fp, scenario_fingerprint(_scenario(more)))
    assert diffs[0] == "task 1 train split differs (10 images in the run, 12 now)"


def test_fingerprint_hashes_the_source_bytes_not_resized_floats(monkeypatch):
    """Resizing runs in float and may differ in the last bit between CPUs; a resume on
    another machine must not be refused for that, so the digests cover the uint8 source."""
    from dgm_tf.data import scenario as scenario_module

    raw = _raw()
    fp = scenario_fingerprint(_scenario(raw))
    original = scenario_module.to_model_images

    def noisy(x, size=32, **kwargs):
        out = original(x, size, **kwargs)
        return np.nextafter(out, np.float32(0))  # the last bit moves

    monkeypatch.setattr(scenario_module, "to_model_images", noisy)
    assert scenario_fingerprint(_scenario(raw)) == fp


# ================================================================ bad files


def _idx_header(shape, type_code=0x08):
    return bytes([0, 0, type_code, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)


def _gzip_of_zeros(prefix: bytes, n_zeros: int) -> bytes:
    """gzip of ``prefix`` + ``n_zeros`` zero bytes, built in 1 MiB steps."""
    c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [c.compress(prefix)]
    chunk = bytes(1 << 20)
    for _ in range(n_zeros >> 20):
        parts.append(c.compress(chunk))
    parts.append(c.compress(bytes(n_zeros & ((1 << 20) - 1))))
    parts.append(c.flush())
    return b"".join(parts)


def test_idx_gzip_bomb_fails_naming_the_file_without_inflating_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # A valid 10x28x28 file followed by 32 MiB of zeros (143 KiB on disk).
    path.write_bytes(_gzip_of_zeros(_idx_header((10, 28, 28)) + bytes(10 * 28 * 28), 32 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            sources.read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "after" in str(err.value)
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while rejecting a 32 MiB bomb"


def test_idx_gzip_header_declaring_more_than_the_file_can_hold_is_refused(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    # 2^20 images of 28x28 declared (822 MB) in 143 KiB of gzip (32 MiB of zeros):
    # deflate expands at most 1032:1, so the header cannot be right.
    path.write_bytes(_gzip_of_zeros(_idx_header((1 << 20, 28, 28)), 32 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            sources.read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "cannot hold" in str(err.value)
    assert peak < 8 << 20


def test_idx_gzip_multi_member_still_reads(tmp_path):
    data = _idx_header((3, 2, 2)) + bytes(range(12))
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(data[:9]) + gzip.compress(data[9:]))
    np.testing.assert_array_equal(sources.read_idx(path).ravel(), np.arange(12))


def test_plain_idx_declaring_more_than_its_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx_header((1 << 30, 28, 28)) + bytes(100))
    with pytest.raises(DataError, match="truncated") as err:
        sources.read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_idx_images_with_other_than_1_or_3_channels_are_refused_at_load(tmp_path, channels):
    directory = tmp_path / "d"
    directory.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 4, 4, channels), dtype=np.uint8)
    (directory / "train-images-idx3-ubyte").write_bytes(_idx_header(images.shape) + images.tobytes())
    (directory / "t10k-images-idx3-ubyte").write_bytes(_idx_header(images.shape) + images.tobytes())
    labels = np.arange(6, dtype=np.uint8) % 2
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (directory / name).write_bytes(_idx_header(labels.shape) + labels.tobytes())
    with pytest.raises(DataError) as err:
        load_dataset(f"idx:{directory}")
    assert "train-images-idx3-ubyte" in str(err.value) and f"{channels} channels" in str(err.value)


def _npz_with_member(path, name, header_shape, payload: bytes, compress=zipfile.ZIP_STORED):
    """An npz whose member ``name`` has an .npy header declaring ``header_shape`` (uint8)."""
    import io

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr(name, head.getvalue() + payload)
        rng = np.random.default_rng(0)
        for key, arr in {
            "y_train": np.arange(4) % 2, "x_test": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
            "y_test": np.arange(4) % 2,
        }.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{key}.npy", buf.getvalue())


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_member_declaring_a_huge_shape_fails_naming_file_and_member(tmp_path, compress):
    path = tmp_path / "data.npz"
    _npz_with_member(path, "x_train.npy", (1 << 28, 64, 64), bytes(64), compress)  # declares 1 TiB
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            load_npz(path, test_fraction=0.2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message and "'x_train'" in message and "declares" in message
    assert peak < 8 << 20


def test_npz_member_whose_zip_directory_claims_more_than_deflate_can_expand_is_refused(tmp_path):
    """Header and directory agree on 1 GB, but 64 deflated bytes cannot expand to that."""
    path = tmp_path / "data.npz"
    _npz_with_member(path, "x_train.npy", (1000, 1000, 1000), bytes(64), zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # the first central directory entry: x_train.npy
    assert data[central + 46 : central + 46 + len("x_train.npy")] == b"x_train.npy"
    data[central + 24 : central + 28] = (128 + 10**9).to_bytes(4, "little")  # uncompressed size
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            load_npz(path, test_fraction=0.2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "'x_train'" in str(err.value)
    assert peak < 8 << 20


def _timed(fn):
    start = time.perf_counter()
    try:
        fn()
    except DataError as e:
        return time.perf_counter() - start, str(e)
    raise AssertionError("no DataError")


# 100,000 names: a quadratic duplicate check makes 10^10 comparisons (minutes); a linear
# one takes well under a second even on a loaded 2-core machine.
_K = 100_000


def test_duplicate_class_names_in_a_names_file_are_found_in_linear_time(tmp_path):
    from tests.test_data import make_idx_dir

    make_idx_dir(tmp_path / "d")
    names = [f"class{i}" for i in range(_K)] + ["class7"]
    (tmp_path / "d" / "class_names.txt").write_text("\n".join(names) + "\n")
    seconds, message = _timed(lambda: load_dataset(f"idx:{tmp_path / 'd'}"))
    assert "duplicate class names ['class7']" in message and seconds < 5


def test_duplicate_npz_class_names_are_found_in_linear_time(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), y=np.arange(4) % 2,
             class_names=np.array([f"n{i}" for i in range(_K)] + ["n3"]))
    seconds, message = _timed(lambda: load_npz(path, test_fraction=0.5, seed=0))
    assert "duplicate names ['n3']" in message and seconds < 5


def test_repeated_class_ids_in_the_order_are_found_in_linear_time():
    raw = RawDataset("many", np.zeros((_K, 1, 1, 1), np.uint8), np.arange(_K), np.zeros((_K, 1, 1, 1), np.uint8),
                     np.arange(_K), tuple(str(i) for i in range(_K)))
    order = list(range(_K)) + [5]
    seconds, message = _timed(
        lambda: make_scenario(raw, class_order=order, classes_per_task=1, num_tasks=None, image_size=1)
    )
    assert "class ids [5] appear more than once" in message and seconds < 5


# ============================================================ non-finite values


@pytest.mark.parametrize("bad, word", [(np.nan, "(1 NaN, 0 infinite)"), (np.inf, "(0 NaN, 1 infinite)"),
                                       (-np.inf, "(0 NaN, 1 infinite)")])
def test_image_grid_non_finite_pixels_raise_a_specific_error(bad, word):
    images = np.zeros((4, 3, 3, 1), np.float32)
    images[2, 1, 1, 0] = bad
    with pytest.raises(io_utils.NonFiniteError) as err:
        io_utils.image_grid(images, ncols=2)
    assert isinstance(err.value, ValueError)
    assert word in str(err.value) and "image 2" in str(err.value) and "1 of 4 images" in str(err.value)


def test_check_finite_names_the_first_bad_variable():
    import keras

    good = keras.Variable(np.ones((2, 2), np.float32), name="kernel")
    bad = keras.Variable(np.array([1.0, np.nan, np.inf], np.float32), name="bias")
    io_utils.check_finite([good, np.arange(3)], what="classifier weights")  # integers are fine
    with pytest.raises(io_utils.NonFiniteError) as err:
        io_utils.check_finite([good, bad, bad], what="classifier weights")
    message = str(err.value)
    assert "classifier weights" in message and "bias" in message
    assert "1 NaN" in message and "1 infinite" in message and "of 3" in message
    with pytest.raises(io_utils.NonFiniteError, match=r"'d_opt/0003'"):
        io_utils.check_finite({"d_opt/0002": np.zeros(2), "d_opt/0003": np.array([np.inf])})


# ===================================================== engine integration
#
# These drive engine.run_experiment and the CLI: a tiny joint run (its stored task data
# are shared blobs referenced by every later checkpoint) on an npz copy of two embedded
# classes. They pin the engine's guards: the workdir lock, the restore through
# CheckpointManager.restore_newest, the data fingerprint and io_utils.NonFiniteError
# turned into TrainingError.

JOINT = dict(method="joint", class_order=(0, 1), epochs=2, train_examples_per_class=16, batch_size=16,
             ndf=4, samples_per_class=2, export=False, keep_checkpoints=2)


def _two_class_npz(path, embedded_raw):
    """Classes 1 and 7 of the embedded sample (40 train, 10 test each) as ids 0, 1."""
    keep_train = np.concatenate([np.flatnonzero(embedded_raw.y_train == c)[:40] for c in (1, 7)])
    keep_test = np.concatenate([np.flatnonzero(embedded_raw.y_test == c)[:10] for c in (1, 7)])
    np.savez(
        path,
        x_train=embedded_raw.x_train[keep_train], y_train=(embedded_raw.y_train[keep_train] == 7).astype(np.int64),
        x_test=embedded_raw.x_test[keep_test], y_test=(embedded_raw.y_test[keep_test] == 7).astype(np.int64),
    )


def _config(npz, **overrides):
    from dgm_tf.config import Config

    return Config(dataset=f"npz:{npz}", **{**JOINT, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, embedded_raw):
    """A finished 2-task joint run of one epoch per task: checkpoints 000003 (task 2,
    epoch 1) and 000004 (task 2 end), both referring to task 1's stored data blob."""
    from dgm_tf import engine

    root = tmp_path_factory.mktemp("durability")
    _two_class_npz(root / "data.npz", embedded_raw)
    engine.run_experiment(_config(root / "data.npz", epochs=1), root / "wd")
    return root


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run's workdir in ``tmp_path / "wd"``; the dataset stays
    where the run's flags say (``finished_run / "data.npz"``), and is put back as it was
    after the test."""
    import shutil

    shutil.copytree(finished_run / "wd", tmp_path / "wd")
    data = (finished_run / "data.npz").read_bytes()
    yield tmp_path
    (finished_run / "data.npz").write_bytes(data)


def _results_without_times(workdir):
    results = json.loads((workdir / "results.json").read_text())
    for key in ("wall_time_s", "time_breakdown_s", "config"):
        results.pop(key)
    return results


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_resume_with_a_damaged_shared_blob_is_refused_and_changes_nothing(finished_run, run_copy, damage):
    from dgm_tf import engine

    wd = run_copy / "wd"
    blob = next((wd / "ckpt" / "shared").glob("joint_task_000_*.npz"))
    if damage == "corrupt":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
    else:
        blob.unlink()
    before = snapshot(wd)
    if damage == "corrupt":
        with pytest.raises(CheckpointError) as err:  # not: a warning and the run starts over
            engine.run_experiment(_config(finished_run / "data.npz", epochs=1), wd, resume=True)
        message = str(err.value)
    else:  # as a user sees it: exit 2, one line, no traceback
        from tests.test_cli import run_cli

        proc = run_cli(f"--flagfile={wd / 'flags.txt'}", f"--workdir={wd}", "--resume")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-2000:]
        message = errors[0]
    assert "000004" in message and "000003" in message and blob.name in message and "new --workdir" in message
    assert snapshot(wd) == before


def test_resume_without_checkpoints_but_with_results_is_refused(finished_run, run_copy):
    """ckpt/ lost (deleted, another disk) while results.json records tasks: starting over
    would overwrite them."""
    import shutil

    from dgm_tf import engine

    wd = run_copy / "wd"
    shutil.rmtree(wd / "ckpt")
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match="holds no checkpoint but results.json records completed tasks"):
        engine.run_experiment(_config(finished_run / "data.npz", epochs=1), wd, resume=True)
    assert snapshot(wd) == before


def test_resume_over_a_checkpoint_of_another_schema_falls_back_or_is_refused(finished_run, run_copy, caplog):
    from dgm_tf import engine

    wd = run_copy / "wd"
    expected = _results_without_times(wd)

    def drop_key(name, key="classifier/0001"):  # a schema change without a format bump
        arrays = dict(np.load(wd / "ckpt" / name / "arrays.npz"))
        arrays.pop(key, None)
        np.savez(wd / "ckpt" / name / "arrays.npz", **arrays)

    drop_key("000004")
    caplog.set_level("WARNING")
    engine.run_experiment(_config(finished_run / "data.npz", epochs=1), wd, resume=True)  # from 000003, warned
    assert "000004" in caplog.text and "classifier/0001" in caplog.text
    assert _results_without_times(wd) == expected  # the same run, finished from the older checkpoint

    for name in [p.name for p in (wd / "ckpt").iterdir() if p.name.isdigit()]:
        drop_key(name)
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match="cannot be restored by this version") as err:
        engine.run_experiment(_config(finished_run / "data.npz", epochs=1), wd, resume=True)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert snapshot(wd) == before


def test_resume_with_changed_data_is_refused_naming_the_split(finished_run, run_copy):
    from dgm_tf import engine

    arrays = dict(np.load(finished_run / "data.npz"))
    arrays["x_test"][np.flatnonzero(arrays["y_test"] == 1)[3], 10, 10, 0] ^= 1  # one pixel of task 2's test set
    np.savez(finished_run / "data.npz", **arrays)  # put back by run_copy
    before = snapshot(run_copy / "wd")
    with pytest.raises(ConfigError, match=r"task 2 test split differs \(images\)") as err:
        engine.run_experiment(_config(finished_run / "data.npz", epochs=1), run_copy / "wd", resume=True)
    assert "task 1" not in str(err.value)
    assert snapshot(run_copy / "wd") == before


def test_resume_on_a_workdir_in_use_is_refused_at_once(finished_run, run_copy):
    """The engine takes the lock before anything else (the lock itself is tested with a
    second real process above; main prints a WorkdirError as one line, exit 2)."""
    from dgm_tf import engine, workdir

    wd = run_copy / "wd"
    with workdir.lock_workdir(wd):  # the "running" run: a second open file description conflicts
        before = snapshot(wd)
        start = time.monotonic()
        with pytest.raises(workdir.WorkdirError, match=f"in use by another run \\(pid {os.getpid()} ") as err:
            engine.run_experiment(_config(finished_run / "data.npz", epochs=1), wd, resume=True)
        assert time.monotonic() - start < 5  # before the data are read
        assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)
        assert snapshot(wd) == before


def test_weights_poisoned_by_an_epochs_last_step_are_never_checkpointed(tmp_path, embedded_raw, monkeypatch):
    from dgm_tf import engine

    _two_class_npz(tmp_path / "data.npz", embedded_raw)
    original = engine.NonFiniteGuard.on_train_batch_end

    def poison(self, batch, logs=None):  # the step's losses are finite; its update is not
        original(self, batch, logs)
        if self.task == 0 and self.epoch == 1 and batch == self.params["steps"] - 1:
            variable = self.model.trainable_variables[0]
            variable.assign(np.full(variable.shape, np.nan, variable.dtype))

    monkeypatch.setattr(engine.NonFiniteGuard, "on_train_batch_end", poison)
    with pytest.raises(engine.TrainingError, match=r"non-finite checkpoint arrays.* in task 1") as err:
        engine.run_experiment(_config(tmp_path / "data.npz", keep_checkpoints=1), tmp_path / "wd")
    assert "\n" not in str(err.value)
    manager = CheckpointManager(tmp_path / "wd" / "ckpt")
    assert [p.name for p in manager.paths()] == ["000001"]  # epoch 1 kept, even with keep=1
    good = manager.newest()
    assert good.state["epochs_done"] == 1 and all(np.isfinite(a).all() for a in good.arrays.values()
                                                  if a.dtype.kind == "f")


def test_a_non_finite_sample_grid_stops_like_a_non_finite_loss(tmp_path, embedded_raw, monkeypatch):
    from dgm_tf import engine
    from dgm_tf.methods.joint import Joint

    _two_class_npz(tmp_path / "data.npz", embedded_raw)
    monkeypatch.setattr(
        Joint, "sample", lambda self, labels, seed: np.full((len(labels), 32, 32, 1), np.nan, np.float32)
    )
    with pytest.raises(engine.TrainingError, match=r"image grid: 2 of 2 images hold non-finite pixels.* in task 1"):
        engine.run_experiment(_config(tmp_path / "data.npz", epochs=1, num_tasks=1), tmp_path / "wd")


def test_a_failing_tensorboard_close_does_not_hide_the_error_that_stopped_training(
    tmp_path, embedded_raw, monkeypatch, caplog
):
    from dgm_tf import engine, monitoring
    from dgm_tf.methods.joint import Joint

    _two_class_npz(tmp_path / "data.npz", embedded_raw)
    monkeypatch.setattr(
        Joint, "sample", lambda self, labels, seed: np.full((len(labels), 32, 32, 1), np.nan, np.float32)
    )

    def close(self):
        raise OSError(28, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(monitoring.Monitor, "close", close)
    caplog.set_level("WARNING")
    with pytest.raises(engine.TrainingError, match="non-finite"):  # not the OSError from close()
        engine.run_experiment(_config(tmp_path / "data.npz", epochs=1, num_tasks=1), tmp_path / "wd")
    assert "TensorBoard events could not be flushed" in caplog.text and "No space left" in caplog.text
