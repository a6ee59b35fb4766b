"""The README's quickstarts, end to end (slow: DGMw about 9 minutes on 2 cores, DGMa 20-35)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.test_cli import REPO, run_cli


@pytest.mark.slow
def test_quickstart_remembers_every_class(tmp_path):
    workdir = tmp_path / "quickstart"
    proc = run_cli(f"--flagfile={REPO / 'configs' / 'quickstart.cfg'}", f"--workdir={workdir}", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["tasks_completed"] == 10
    # Chance is 0.10 over ten classes; the bar is 0.40, on A_10 as the paper
    # reports it: each task's test row at its best validation epoch (the reference). That
    # figure measured 0.70-0.76 (oneDNN off; AVX2 and AVX-512 BF16 oneDNN kernels). The
    # last epoch's A_t swings from epoch to epoch (0.51-0.75 at task 10 on the same
    # settings, 0.255 at task 7 in one run), so a bar on it would test that swing.
    assert results["best_validation_average_accuracy"][-1] >= 0.40
    # The generative memory: the final classifier recognises generated images of the
    # old classes well above chance on average.
    assert np.mean(results["replay_accuracy"][-1]) > 0.5
    widths = [s["generator_widths"] for s in results["method_state"]]
    assert np.all(np.diff(np.array(widths), axis=0) >= 0)
    grid = tf.io.decode_png(tf.io.read_file(str(workdir / "samples" / "task_10.png"))).numpy()
    assert grid.shape[0] == 10 * 34 + 2  # one row per class
    # The README's serving promise: ten servable versions of both models.
    for model in ("classifier", "generator"):
        versions = sorted(int(p.name) for p in (workdir / "export" / model).iterdir())
        assert versions == list(range(1, 11))
    served = tf.saved_model.load(str(workdir / "export" / "classifier" / "10")).signatures["serving_default"]
    out = served(images=tf.zeros([2, 28, 28, 1], tf.uint8))
    assert out["probabilities"].shape == (2, 10)


@pytest.mark.slow
def test_dgma_quickstart_remembers_every_class(tmp_path):
    """configs/quickstart_dgma.cfg (20-35 minutes on 2 cores): README reports A_10 0.688."""
    workdir = tmp_path / "quickstart_dgma"
    proc = run_cli(f"--flagfile={REPO / 'configs' / 'quickstart_dgma.cfg'}", f"--workdir={workdir}", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["method"] == "dgma" and results["tasks_completed"] == 10
    # Best-validation A_10 (as for DGMw above): 0.673 on AVX2 oneDNN kernels (README),
    # 0.691 on AVX-512 BF16 ones; mean replay accuracy 0.987 there (0.93-1.0 after every
    # task). Single runs: the bars keep 0.17 and 0.19 of margin.
    assert results["best_validation_average_accuracy"][-1] >= 0.5
    assert np.mean(results["replay_accuracy"][-1]) > 0.8
    for before, after in zip(results["method_state"], results["method_state"][1:]):
        # Growth adds exactly the channels the task newly reserved.
        assert after["generator_widths"] == [w + n for w, n in zip(before["generator_widths"], before["newly_reserved"])]
