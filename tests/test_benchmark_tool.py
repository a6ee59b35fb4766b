"""tools/benchmark.py runs and reports what it promises (no speed assertions here)."""

import json
import subprocess
import sys

import pytest

from tests.test_cli import REPO


# bf16 is emulated (slowly) on CPUs without AVX512_BF16, so its rows run with -m slow,
# and so does the row of task 0 (each task traces half a dozen functions): the default
# run times task 1 only, the one with replay.
@pytest.mark.parametrize(
    "precisions,tasks",
    [(["float32"], (1,)), pytest.param(["float32", "mixed_bfloat16"], (0, 1), marks=pytest.mark.slow)],
)
def test_benchmark_tool_reports_iteration_phases_and_floor(tmp_path, precisions, tasks):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "tools/benchmark.py", "--class_order=1,7", "--train_examples_per_class=32",
            "--batch_size=16", "--nz=16", "--ngf=2", "--ndf=4", f"--tasks={','.join(map(str, tasks))}", "--xla=false",
            f"--precisions={','.join(precisions)}",
            "--iterations=1", "--repeats=1", "--warmup=0", f"--output={out}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["tensorflow"]
    rows = report["results"]
    assert [(r["precision"], r["task"]) for r in rows] == [(p, t) for p in precisions for t in tasks]
    for r in rows:
        assert r["iteration_ms"] > 0 and r["floor_ms"] > 0
        assert set(r["phase_ms"]) == {"classifier", "critic", "generator"}
        assert r["ratio_to_floor"] == r["iteration_ms"] / r["floor_ms"]
        # The real path: one epoch of the run's own loop over its pipeline
        # (32 images at batch 16: 2 steps), per step, against the bare iteration.
        assert r["real_path_ms"] > 0 and r["real_path_steps_per_epoch"] == 2
        assert r["real_path_ratio"] == r["real_path_ms"] / r["iteration_ms"]
        assert r["peak_rss_mib"] > 100
    # Task 1 replays task 0; task 0 has nothing to replay.
    replay = {r["task"]: r["replay_images"] for r in rows}
    assert replay[1] > 0 and replay.get(0, 0) == 0
    assert all(r["replay_images"] == replay[r["task"]] for r in rows)
    assert "iter ms" in proc.stdout and "ratio" in proc.stdout and "real/it" in proc.stdout


def test_benchmark_rejects_an_unknown_precision(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--precisions=fp8", "--tasks=0", f"--output={tmp_path / 'b.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "--precisions" in proc.stderr and "fp8" in proc.stderr
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_benchmark_times_dgma(tmp_path):
    out = tmp_path / "bench.json"
    common = [
        sys.executable, "tools/benchmark.py", "--class_order=1,7", "--train_examples_per_class=32",
        "--batch_size=16", "--nz=16", "--ngf=2", "--ndf=4", "--tasks=1", "--xla=false", "--precisions=float32",
        "--iterations=1", "--repeats=1", "--warmup=0", f"--output={out}",
    ]
    proc = subprocess.run(common + ["--method=dgma"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    # Task 0 reserved some channels, so the generator grew channel by channel.
    assert row["task"] == 1 and row["iteration_ms"] > 0 and row["replay_images"] > 0
    assert all(w > w0 for w, w0 in zip(row["generator_widths"], (8, 4, 2)))


def test_benchmark_refuses_methods_without_a_dgm_iteration(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--method=finetune", "--class_order=1,7",
         "--train_examples_per_class=8", "--tasks=0", f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "--method" in proc.stderr and "finetune" not in proc.stderr.split("choose")[-1]
    assert not out.exists()
