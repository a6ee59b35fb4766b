"""tools/report.py: tables, spread, grouping, unfinished runs, plots and bad input, on
synthetic run directories with known numbers; and one real run end to end."""

import importlib.util
import json
import math
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from dgm_tf.config import Config
from tests.test_cli import REPO, TINY, run_cli


def _load_tool():
    spec = importlib.util.spec_from_file_location("dgm_tf_report_under_test", REPO / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


report = _load_tool()

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
# make venv installs it ('.[test,report]'); a venv built before that can add it with
# `.venv/bin/pip install matplotlib`.
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed: pip install -e '.[report]'")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- synthetic runs ------------------------------------------------------------------------


def tiny_png(width=6, height=4) -> bytes:
    """A valid grey PNG (what samples/task_XX.png is), written without any library."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes((x * 40) % 256 for x in range(width)) for _ in range(height))
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_run(root, name, *, method="dgmw", seed=0, class_order=(1, 7), classes_per_task=1, completed=None,
              last=0.5, best=0.5, aware=1.0, forgetting=0.5, bwt=-0.5, replay=(1.0, 1.0), params=1000,
              stored=None, wall=None, reserved=True, samples=True, results=True,
              **flags):
    """A run directory as dgm_tf.main leaves it: flags.txt from Config.to_flags and a
    results.json whose figures after the last task are the arguments."""
    path = pathlib.Path(root) / name
    path.mkdir(parents=True)
    config = Config(method=method, seed=seed, class_order=tuple(class_order), classes_per_task=classes_per_task,
                    epochs=2, **flags)
    (path / "flags.txt").write_text("# Reproduces this run\n" + "\n".join(config.to_flags()) + "\n")
    tasks = [list(class_order[i:i + classes_per_task]) for i in range(0, len(class_order), classes_per_task)]
    T = len(tasks)
    done = T if completed is None else completed

    def curve(final):  # A_1 = 1.0, ..., A_T = final
        return ([1.0] * (T - 1) + [final])[:done]

    generative = method in ("dgmw", "dgma")
    matrix = [[1.0 if j == i else (0.5 if j < i else None) for j in range(T)] for i in range(T)]
    states = []
    for t in range(done):
        state = {"generator_params": params * (t + 1) // T} if generative else {"num_classes": t + 1}
        if generative and reserved:
            state["reserved_fraction"] = [0.2 * (t + 1), 0.25 * (t + 1)]  # two masked layers
        if stored is not None:
            state["stored_examples"] = stored * (t + 1) // T
        states.append(state)
    data = {
        "method": method, "dataset": "embedded:fashion_mnist", "class_order": list(class_order),
        "class_names": [str(c) for c in class_order], "tasks": tasks, "tasks_completed": done,
        "accuracy_matrix": [row if i < done else [None] * T for i, row in enumerate(matrix)],
        "average_accuracy": curve(best), "task_aware_accuracy_matrix": matrix,
        "task_aware_average_accuracy": curve(aware),
        "best_validation_average_accuracy": curve(best), "last_epoch_average_accuracy": curve(last),
        "forgetting": None, "average_forgetting": forgetting if done == T else 0.0,
        "bwt": bwt if done == T else 0.0,
        "replay_accuracy": ([[1.0] * (t + 1) for t in range(T - 1)] + [list(replay)])[:done] if generative
        else [None] * done,
        "generator_params": [s.get("generator_params") for s in states],
        "method_state": states, "wall_time_s": (list(wall) if wall else [10.0] * T)[:done], "time_breakdown_s": [{}] * done,
    }
    if results:
        (path / "results.json").write_text(json.dumps(data))
    if generative and samples:
        (path / "samples").mkdir()
        for t in range(done):
            (path / "samples" / f"task_{t + 1:02d}.png").write_bytes(tiny_png(6, 4 * (t + 1)))
    return path


def run_report(dirs, out, capsys=None):
    code = report.main([str(d) for d in dirs] + ["--out", str(out)])
    captured = capsys.readouterr() if capsys is not None else None
    return code, captured


def tables(md: str) -> list[list[dict]]:
    """Every markdown table of report.md as a list of {header: cell} rows."""
    found, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, [c.strip() for c in lines[i].strip("|").split(" | ")])))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking signature, chunk CRCs and IEND."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path.name}: bad CRC in {kind!r}"
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds and pos == len(data)
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def fast_plots(monkeypatch):
    """Tests of the tables skip drawing (about 0.3 s a figure); the plots have their own test."""

    def touch(path, *args):
        pathlib.Path(path).write_bytes(b"")

    def capacity(path, run):
        touch(path)
        return report.capacity_series(run)[2]

    monkeypatch.setattr(report, "plot_curves", touch)
    monkeypatch.setattr(report, "plot_matrix", touch)
    monkeypatch.setattr(report, "plot_capacity", capacity)


# -- tables ---------------------------------------------------------------------------------


@needs_mpl
def test_table_has_mean_and_sample_sd_over_seeds_and_marks_single_runs(tmp_path, capsys, fast_plots):
    runs = tmp_path / "runs"
    dirs = [
        # Three seeds of one DGMw config. Sample sd of 0.6/0.7/0.8 is 0.100 (population: 0.082).
        write_run(runs, "dgmw_s0", seed=0, last=0.6, best=0.5, aware=0.9, forgetting=0.3, bwt=-0.3,
                  replay=(1.0, 0.8), params=4000, wall=(10.0, 20.0)),
        write_run(runs, "dgmw_s1", seed=1, last=0.7, best=0.6, aware=0.8, forgetting=0.2, bwt=-0.2,
                  replay=(0.9, 0.9), params=5000, wall=(15.0, 20.0)),
        write_run(runs, "dgmw_s2", seed=2, last=0.8, best=0.9, aware=0.7, forgetting=0.1, bwt=-0.1,
                  replay=(1.0, 1.0), params=6000, wall=(20.0, 20.0)),
        write_run(runs, "mas_s0", method="mas", last=0.25, best=0.45, aware=1.0, forgetting=0.75, bwt=-0.75,
                  wall=(1.5, 2.0), mas_lambda=100.0),
        write_run(runs, "joint_s0", method="joint", last=0.85, best=0.85, aware=1.0, forgetting=0.0, bwt=0.0,
                  stored=1020, wall=(3.0, 4.0)),
    ]
    out = tmp_path / "report"
    code, cap = run_report(dirs, out, capsys)
    assert code == 0, cap.err
    md = (out / "report.md").read_text()
    assert md.splitlines()[0] == report.MARKER
    assert "sample standard deviation (n − 1 in the denominator)" in md
    [table] = tables(md)[:1]
    rows = {r["method [group]"].split(" [")[0]: r for r in table}
    assert list(rows) == ["dgmw", "joint", "mas"]  # dgmw, dgma, finetune, joint, mas
    d = rows["dgmw"]
    assert d["n"] == "3 (seeds 0, 1, 2)"
    assert d["A_2 last epoch"] == "0.700 ± 0.100"
    assert d["A_2 best validation"] == "0.667 ± 0.208"  # mean 2/3, sd sqrt(0.13/3)
    assert d["task-aware A_2"] == "0.800 ± 0.100"
    assert d["avg forgetting"] == "0.200 ± 0.100"
    assert d["BWT"] == "-0.200 ± 0.100"
    assert d["replay accuracy"] == "0.933 ± 0.058"  # per-run class means 0.9, 0.9, 1.0
    assert d["memory after the last task"] == "5,000 ± 1,000 generator params"
    assert d["wall time"] == "35.0 ± 5.0 s"  # sums of wall_time_s: 30, 35, 40
    m = rows["mas"]
    assert m["n"] == "1 (single run, seed 0)"
    assert (m["A_2 last epoch"], m["A_2 best validation"], m["BWT"]) == ("0.250", "0.450", "-0.750")
    assert m["replay accuracy"] == "–" and m["memory after the last task"] == "–" and m["wall time"] == "3.5 s"
    assert rows["joint"]["memory after the last task"] == "1,020 stored images"
    assert "±" not in "".join(m.values()) + "".join(rows["joint"].values())
    assert "Where the time went" not in md  # these results.json carry no time breakdown


def test_memory_is_generator_params_or_stored_images():
    def run(**results):
        return report.Run(path=pathlib.Path("r"), flags={}, results=results)

    assert report.memory_size(run(generator_params=[10, 20], method_state=[{}, {}])) == (20.0, "generator params")
    assert report.memory_size(run(method_state=[{"stored_examples": 5}, {"stored_examples": 9}])) == (9.0, "stored images")
    assert report.memory_size(run(generator_params=[None], method_state=[{"buffer": 1000}])) == (1000.0, "stored images")
    assert report.memory_size(run(generator_params=[None], method_state=[{"buffer_filled": 478}])) == (478.0, "stored images")
    assert report.memory_size(run(generator_params=[None], method_state=[{"mas_omega_mean": 0.1}])) == (None, "")


@needs_mpl
def test_grouping_keeps_configs_apart_but_ignores_seed_and_flags_that_change_no_result(tmp_path, capsys, fast_plots):
    runs = tmp_path / "runs"
    dirs = [
        write_run(runs, "a0", seed=0, last=0.4),
        # Same experiment: only flags listed in IGNORED_FLAGS differ.
        write_run(runs, "a1", seed=1, last=0.6, keep_checkpoints=1, log_every_steps=7, samples_per_class=3,
                  data_dir="/elsewhere"),
        write_run(runs, "b0", seed=0, last=0.8, aux_g=True),
        write_run(runs, "b1", seed=1, last=0.9, aux_g=True),
        write_run(runs, "c0", seed=0, last=0.1, export=False),  # export changes wall time: kept apart
        # Another scenario: two tasks of two classes.
        write_run(runs, "d0", seed=0, class_order=(1, 7, 8, 9), classes_per_task=2, last=0.3),
    ]
    out = tmp_path / "report"
    code, cap = run_report(dirs, out, capsys)
    assert code == 0, cap.err
    md = (out / "report.md").read_text()
    first, second = tables(md)[:2]
    by_label = {r["method [group]"]: r for r in first}
    assert len(by_label) == 3
    cells = {k.split(" [")[0]: (v["n"], v["A_2 last epoch"]) for k, v in by_label.items()}
    assert cells["dgmw (aux_g=false, export=true)"] == ("2 (seeds 0, 1)", "0.500 ± 0.141")
    assert cells["dgmw (aux_g=true, export=true)"] == ("2 (seeds 0, 1)", "0.850 ± 0.071")
    assert cells["dgmw (aux_g=false, export=false)"] == ("1 (single run, seed 0)", "0.100")
    assert [(r["n"], r["A_2 last epoch"]) for r in second] == [("1 (single run, seed 0)", "0.300")]
    assert md.count("## Scenario ") == 2 and "2 tasks x 2 classes, class order 1,7,8,9" in md
    for flag in report.IGNORED_FLAGS:
        assert f"- `--{flag}`: " in md  # each ignored flag is listed with its reason


@needs_mpl
def test_a_run_from_before_a_flag_existed_groups_as_that_flags_default(tmp_path, capsys, fast_plots):
    """flags.txt of a run written before --critic existed does not name it: the run
    ran as the default does, so it groups with runs that name the default, not with
    runs that name another value."""
    runs = tmp_path / "runs"
    old = write_run(runs, "old", seed=0, last=0.4)
    text = (old / "flags.txt").read_text()
    assert "--critic=dcgan\n" in text
    (old / "flags.txt").write_text(text.replace("--critic=dcgan\n", ""))
    dirs = [old, write_run(runs, "new", seed=1, last=0.6), write_run(runs, "other", seed=2, last=0.9,
                                                                       critic="resnet18")]
    code, cap = run_report(dirs, tmp_path / "report", capsys)
    assert code == 0, cap.err
    rows = {r["method [group]"].split(" [")[0]: r["n"] for r in tables((tmp_path / "report" / "report.md").read_text())[0]}
    assert rows == {"dgmw (critic=dcgan)": "2 (seeds 0, 1)", "dgmw (critic=resnet18)": "1 (single run, seed 2)"}, rows
    assert report.default_flags()["critic"] == "dcgan" and report.default_flags()["seed"] == "0"


@needs_mpl
def test_unfinished_runs_are_listed_and_never_averaged_in(tmp_path, capsys, fast_plots):
    runs = tmp_path / "runs"
    dirs = [
        write_run(runs, "s0", seed=0, last=0.6, class_order=(1, 7, 8)),
        write_run(runs, "s1", seed=1, last=0.8, class_order=(1, 7, 8)),
        # Same config, stopped after task 1 of 3 (its A_1 = 1.0 would move the mean).
        write_run(runs, "s2", seed=2, last=0.0, class_order=(1, 7, 8), completed=1),
        # Stopped before its first task ended: flags.txt only.
        write_run(runs, "s3", seed=3, class_order=(1, 7, 8), results=False),
    ]
    out = tmp_path / "report"
    code, cap = run_report(dirs, out, capsys)
    assert code == 0, cap.err
    md = (out / "report.md").read_text()
    table, not_finished, all_runs = tables(md)
    [row] = table
    assert row["n"] == "2 (seeds 0, 1); 1 unfinished left out"
    assert row["A_3 last epoch"] == "0.700 ± 0.141"
    assert {r["run"]: r["tasks done"] for r in not_finished} == {"s2": "1 of 3", "s3": "0 (no results.json)"}
    assert "no results.json" in {r["run"]: r["why"] for r in not_finished}["s3"]
    assert [r["run"] for r in all_runs] == ["s0", "s1", "s2", "s3"]
    assert "`s2` (dgmw, seed 2: 1 of 3 tasks)" in md
    # The curves average the same runs as the table.
    loaded = report.load_runs([str(d) for d in dirs], lambda m: None)
    [scenario] = report.build_scenarios(loaded, lambda m: None)
    [group] = scenario.groups
    assert [r.run_id for r in group.runs] == ["s0", "s1"] and [r.run_id for r in group.unfinished] == ["s2"]
    mean, sd, n = report.curve_band(group.runs, report.last_epoch_curve)
    # Sample sd of 0.6 and 0.8: 0.2 / sqrt(2) (population sd: 0.1).
    assert n == 2 and mean == pytest.approx([1.0, 1.0, 0.7]) and sd == pytest.approx([0.0, 0.0, 0.2 / 2 ** 0.5])
    assert report.curve_band(group.runs[:1], report.last_epoch_curve)[1] is None  # one run: no band


@needs_mpl
def test_runs_with_the_same_folder_name_get_distinct_ids_and_a_folder_given_twice_is_read_once(
        tmp_path, capsys, fast_plots):
    a = write_run(tmp_path / "x", "wd", seed=0)
    b = write_run(tmp_path / "y", "wd", seed=1)
    out = tmp_path / "report"
    code, cap = run_report([a, b, a], out, capsys)
    assert code == 0 and cap.err.count("warning: ") == 1 and "read once" in cap.err
    assert (out / "matrix_wd.png").exists() and (out / "matrix_wd-2.png").exists()
    [row] = tables((out / "report.md").read_text())[0]
    assert row["n"] == "2 (seeds 0, 1)"


@needs_mpl
def test_every_plot_is_a_png_of_its_size_and_dgm_runs_get_capacity_and_samples(tmp_path, capsys):
    runs = tmp_path / "runs"
    dirs = [
        write_run(runs, "dgmw_s0", seed=0), write_run(runs, "dgmw_s1", seed=1),
        write_run(runs, "dgma_s0", method="dgma", reserved=False, samples=False),  # what results.json lacks
        write_run(runs, "finetune_s0", method="finetune"),
    ]
    out = tmp_path / "report"
    code, cap = run_report(dirs, out, capsys)
    assert code == 0, cap.err
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    curves = [p for p in pngs if p.startswith("curves_")]
    assert len(curves) == 1
    assert sorted(set(pngs) - set(curves)) == sorted(
        [f"matrix_{r}.png" for r in ("dgmw_s0", "dgmw_s1", "dgma_s0", "finetune_s0")]
        + [f"capacity_{r}.png" for r in ("dgmw_s0", "dgmw_s1", "dgma_s0")]
        + ["samples/dgmw_s0_task_02.png", "samples/dgmw_s1_task_02.png"]
    )
    expected = {"curves": (1100, 450), "matrix": (560, 480), "capacity": (1000, 400)}
    from matplotlib import image

    for p in pngs:
        kind = p.split("_")[0]
        if kind in expected:
            assert png_size(out / p) == expected[kind], p
            assert image.imread(out / p).shape[:2] == expected[kind][::-1]
    # The last grid, copied byte for byte.
    assert (out / "samples/dgmw_s0_task_02.png").read_bytes() == (runs / "dgmw_s0/samples/task_02.png").read_bytes()
    assert png_size(out / "samples/dgmw_s0_task_02.png") == (6, 8)
    md = (out / "report.md").read_text()
    for p in pngs:
        assert f"]({p})" in md  # every image is linked from the report
    assert "Generator parameters after each task: 500, 1,000." in md
    assert "layer 1: 0.600, layer 2: 0.500." in md  # 1 - reserved_fraction after the last task
    section = md.split("#### `dgma_s0`")[1].split("####")[0]
    assert "Missing: free capacity: not in results.json" in section
    assert "Missing: no sample grid in samples/." in section
    assert "capacity_finetune_s0" not in md


# -- bad input and --out --------------------------------------------------------------------


def _bad_results(content):
    def make(root):
        path = write_run(root, "bad")
        (path / "results.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


def _bad_flags(root):
    path = write_run(root, "bad")
    (path / "flags.txt").write_text("# comment\n--method=dgmw\nnot a flag\n")
    return path


def _no_flags(root):
    path = write_run(root, "bad")
    (path / "flags.txt").unlink()
    return path


def _not_a_dir(root):
    path = pathlib.Path(root) / "file.txt"
    path.write_text("x")
    return path


@pytest.mark.parametrize("make, words", [
    (_not_a_dir, "not a directory"),
    (lambda root: pathlib.Path(root) / "missing", "not a directory"),
    (_no_flags, "not a run directory (no flags.txt"),
    (_bad_flags, "flags.txt line 3: expected --name=value"),
    (_bad_results('{"method": "dgmw", '), "results.json: not valid JSON"),
    (_bad_results("[1, 2]"), "results.json: expected a JSON object"),
    (_bad_results('{"method": "dgmw"}'), "results.json: has no 'dataset'"),
    (_bad_results(json.dumps({"method": "dgmw", "dataset": "d", "class_order": [1], "tasks": [[1]],
                              "tasks_completed": 1, "accuracy_matrix": [[1.5]], "average_accuracy": [1.5]})),
     "'average_accuracy' must be 1 accuracies in [0, 1]"),
    (_bad_results('{"method": "dgmw", "dataset": "d", "class_order": [1], "tasks": [[1]], "tasks_completed": 2, '
                  '"accuracy_matrix": [[1.0]], "average_accuracy": [1.0]}'),
     "'tasks_completed' must be an integer in 0..1"),
    (_bad_results(b'{"method": "\xff"}'), "results.json: not UTF-8 text"),
    (_bad_results(json.dumps({"method": "dgmw", "dataset": "d", "class_order": [1], "tasks": [[1]],
                              "tasks_completed": 1, "accuracy_matrix": [[1.0]], "average_accuracy": [1.0],
                              "wall_time_s": [3.0], "time_breakdown_s": [{"iterations": "2 s"}]})),
     "'time_breakdown_s' row 0 must be null or an object of seconds per phase"),
    (_bad_results(json.dumps({"method": "dgmw", "dataset": "d", "class_order": [1], "tasks": [[1]],
                              "tasks_completed": 1, "accuracy_matrix": [[1.0]], "average_accuracy": [1.0],
                              "time_breakdown_s": [[2.0]]})),
     "'time_breakdown_s' row 0 must be null or an object of seconds per phase"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make, words):
    good = write_run(tmp_path / "runs", "good")
    bad = make(tmp_path / "runs")
    out = tmp_path / "out" / "report"
    code, cap = run_report([good, bad], out, capsys)
    assert code == 2
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], cap.err
    assert str(bad) in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, not even the parent


def test_a_results_json_that_contradicts_flags_txt_is_refused(tmp_path, capsys):
    path = write_run(tmp_path / "runs", "r")
    data = json.loads((path / "results.json").read_text())
    (path / "results.json").write_text(json.dumps({**data, "method": "mas"}))
    code, cap = run_report([path], tmp_path / "out", capsys)
    assert code == 2 and cap.err.count("\n") == 1 and "--method=dgmw but results.json says 'mas'" in cap.err


def test_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path)])  # no --out
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and "--out" in err and err.startswith("error: ")


def test_without_matplotlib_the_tool_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    path = write_run(tmp_path / "runs", "r")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, cap = run_report([path], tmp_path / "out", capsys)
    assert code == 2 and cap.err.count("\n") == 1 and "matplotlib is not installed" in cap.err
    assert not (tmp_path / "out").exists()


@needs_mpl
def test_out_is_replaced_only_when_it_holds_a_report_and_never_left_half_written(tmp_path, capsys, monkeypatch,
                                                                                  fast_plots):
    runs = tmp_path / "runs"
    a = write_run(runs, "a", last=0.4)
    b = write_run(runs, "b", last=0.9, seed=1)
    out = tmp_path / "report"
    assert run_report([a], out, capsys)[0] == 0
    first = (out / "report.md").read_text()
    # A failure while writing the second report leaves the first one as it was.
    def boom(*args):
        raise RuntimeError("boom")

    draw = report.plot_matrix
    monkeypatch.setattr(report, "plot_matrix", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_report([a, b], out, capsys)
    assert (out / "report.md").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]  # no temporary left
    monkeypatch.setattr(report, "plot_matrix", draw)
    # An earlier report is replaced (its stale plots go with it).
    (out / "stale.png").write_bytes(b"x")
    assert run_report([a, b], out, capsys)[0] == 0
    assert "0.650 ± 0.354" not in first and "0.650 ± 0.354" in (out / "report.md").read_text()
    assert not (out / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "runs"]
    # A folder that is not a report is never touched.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, cap = run_report([a], other, capsys)
    assert code == 2 and cap.err.count("\n") == 1 and "is not a report written by tools/report.py" in cap.err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


# -- real runs ------------------------------------------------------------------------------


@needs_mpl
def test_a_real_run_goes_through_the_report(dgm_cli_run, tmp_path):
    """The shared tiny DGMw CLI run (conftest `dgm_cli_run`, 3 tasks), through the CLI;
    the tool imports neither TensorFlow nor Keras nor dgm_tf (-X importtime lists every import)."""
    workdir, _ = dgm_cli_run
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-X", "importtime", "tools/report.py", str(workdir), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib" in imported and not imported & {"tensorflow", "keras", "dgm_tf"}
    results = json.loads((workdir / "results.json").read_text())
    md = (out / "report.md").read_text()
    [row] = tables(md)[0]
    assert row["n"] == "1 (single run, seed 0)"
    assert row["A_3 last epoch"] == f"{results['last_epoch_average_accuracy'][-1]:.3f}"
    assert row["A_3 best validation"] == f"{results['best_validation_average_accuracy'][-1]:.3f}"
    assert row["BWT"] == f"{results['bwt']:+.3f}"
    assert row["memory after the last task"] == f"{results['generator_params'][-1]:,} generator params"
    assert row["replay accuracy"] != "–"
    assert png_size(out / "matrix_wd.png") == (560, 480) and png_size(out / "capacity_wd.png") == (1000, 400)
    assert (out / "samples/wd_task_03.png").read_bytes() == (workdir / "samples/task_03.png").read_bytes()
    assert "Missing:" not in md
    # Where the time went: each phase summed over the tasks, largest first, adding up to
    # the wall time; the share of it that is not training steps (issue 23's measure).
    [phases] = [t for t in tables(md) if t and "phase" in t[0]]
    seconds = {r["phase"].strip("`"): float(r["seconds"]) for r in phases}
    rows = results["time_breakdown_s"]
    assert len(rows) == 3 and seconds == {k: pytest.approx(sum(r[k] for r in rows), abs=0.051) for k in rows[0]}
    assert list(seconds.values()) == sorted(seconds.values(), reverse=True)
    wall = sum(results["wall_time_s"])
    assert sum(seconds.values()) == pytest.approx(wall, abs=0.06 * len(seconds))
    for r in phases:  # from the unrounded seconds: the table rounds each figure on its own
        phase = r["phase"].strip("`")
        share = float(r["share of wall time"].removesuffix(" %"))
        assert share == pytest.approx(100 * sum(row[phase] for row in rows) / wall, abs=0.051)
    wall = math.fsum(results["wall_time_s"])  # as the tool sums them
    non_step = 100 * (wall - math.fsum(r["iterations"] for r in rows)) / wall
    assert f"Not training steps (wall time less `iterations`): {non_step:.1f} %." in md


@pytest.mark.slow
@needs_mpl
def test_real_runs_of_two_seeds_and_two_methods(dgm_cli_run, tmp_path):
    """Two seeds of a tiny fine-tune run beside the shared DGMw run: one group of n = 2."""
    args = [a for a in TINY if not a.startswith("--class_order")] + ["--class_order=1,7,8", "--method=finetune"]
    dirs = []
    for seed in (0, 1):
        wd = tmp_path / f"finetune_s{seed}"
        proc = run_cli(*args, f"--seed={seed}", f"--workdir={wd}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        dirs.append(wd)
    workdir, _ = dgm_cli_run
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "tools/report.py", str(workdir), *map(str, dirs), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "report.md").read_text()
    rows = {r["method [group]"].split(" [")[0]: r for r in tables(md)[0]}
    assert rows["finetune"]["n"] == "2 (seeds 0, 1)"
    finals = [json.loads((d / "results.json").read_text())["last_epoch_average_accuracy"][-1] for d in dirs]
    assert rows["finetune"]["A_3 last epoch"] == f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}"
    assert len(list(out.glob("curves_*.png"))) == 1
