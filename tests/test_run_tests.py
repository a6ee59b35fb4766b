"""tools/run_tests.py, README's test command: shards that cover every module once,
balanced by the durations table, and an exit status that fails when any shard fails.
The end-to-end cases run the runner on a small generated test folder (no TensorFlow)."""

import importlib.util
import json
import pathlib
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("dgm_tf_run_tests_under_test", REPO / "tools" / "run_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load()


def test_shards_cover_every_module_once_and_balance_by_measured_seconds():
    modules = [f"tests/test_{c}.py" for c in "abcdefg"]
    seconds = {"tests/test_a.py": 100.0, "tests/test_b.py": 60.0, "tests/test_c.py": 50.0, "tests/test_d.py": 10.0,
               "tests/test_e.py": 5.0, "tests/test_f.py": 5.0}  # test_g unknown: the known median, 30 s
    shards = rt.shard(modules, seconds, 2)
    assert sorted(m for s in shards for m in s) == modules  # each module exactly once
    load = sorted(sum(seconds.get(m, 30.0) for m in s) for s in shards)
    # Heaviest first onto the lighter shard: a | b, c | a+g | b+c+d+e+f: 130 each.
    assert load == [130.0, 130.0]
    assert [sorted(s) for s in shards if "tests/test_a.py" in s] == [["tests/test_a.py", "tests/test_g.py"]]
    assert rt.shard(modules, seconds, 2) == shards  # deterministic
    # More shards than modules: no empty shard.
    assert len(rt.shard(modules[:2], {}, 4)) == 2


def test_modules_sharing_an_expensive_fixture_stay_in_one_shard(tmp_path):
    modules = [f"tests/test_{c}.py" for c in "abcd"]
    seconds = dict(zip(modules, (40.0, 30.0, 20.0, 10.0)))
    assert rt.shard(modules, seconds, 2) == [["tests/test_a.py", "tests/test_d.py"], ["tests/test_b.py", "tests/test_c.py"]]
    # a and b both use the shared run: together (70 s) against c + d (30 s).
    assert rt.shard(modules, seconds, 2, [["tests/test_a.py", "tests/test_b.py"]]) == [
        ["tests/test_a.py", "tests/test_b.py"], ["tests/test_c.py", "tests/test_d.py"]]
    (tmp_path / "tests").mkdir()
    for m, text in zip(modules, ("def test(dgm_cli_run): pass", "x = 'dgm_cli_run'", "", "")):
        (tmp_path / m).write_text(text)
    assert rt.together(tmp_path, modules) == [["tests/test_a.py", "tests/test_b.py"]]
    # This repository: every module that reads the shared CLI run is in one shard.
    real = rt.test_modules(REPO)
    users = next(g for g in rt.together(REPO, real))
    assert {"tests/test_cli.py", "tests/test_resume.py"} <= set(users)
    shards = rt.shard(real, rt.load_durations(REPO / rt.DURATIONS_FILE), 2, rt.together(REPO, real))
    assert sum(1 for s in shards if set(users) & set(s)) == 1


def test_module_seconds_sums_junit_cases_per_module(tmp_path):
    (tmp_path / "a.xml").write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.test_x" name="one" time="1.5"/>
          <testcase classname="tests.test_x.TestGroup" name="two" time="2.0"/>
          <testcase classname="tests.test_y" name="three" time="0.25"/>
        </testsuite></testsuites>"""))
    assert rt.module_seconds([tmp_path / "a.xml", tmp_path / "missing.xml"]) == {
        "tests/test_x.py": 3.5, "tests/test_y.py": 0.25}


def test_arguments_naming_tests_run_as_one_process():
    assert rt._selects_paths(["tests/test_export.py", "-k", "serving"])
    assert rt._selects_paths(["tests/test_cli.py::test_help"])
    assert not rt._selects_paths(["-m", "slow", "-q"])


def _fake_repo(root: pathlib.Path, failing: bool) -> pathlib.Path:
    tests = root / "tests"
    tests.mkdir(parents=True)
    for name in "abc":
        (tests / f"test_{name}.py").write_text(f"def test_{name}():\n    assert True\n")
    (tests / "test_d.py").write_text(f"def test_d():\n    assert {not failing}, 'shard failure shown'\n")
    return root


def test_runner_passes_when_every_shard_passes_and_records_durations(tmp_path, capsys):
    repo = _fake_repo(tmp_path / "repo", failing=False)
    code = rt.main(["--jobs=2", "--update_durations", "-q", "-p", "no:cacheprovider"], repo=repo)
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("===== shard") == 2 and "all shards done" in out
    table = json.loads((repo / "tests" / "durations.json").read_text())["seconds"]
    assert sorted(table) == [f"tests/test_{c}.py" for c in "abcd"]  # every module ran, in one shard or the other


def test_runner_fails_when_one_shard_fails_and_shows_its_output(tmp_path, capsys):
    repo = _fake_repo(tmp_path / "repo", failing=True)
    code = rt.main(["--jobs=2", "-q", "-p", "no:cacheprovider"], repo=repo)
    out = capsys.readouterr().out
    assert code == 1
    assert "shard failure shown" in out and "1 failed" in out


def test_runner_reports_no_tests_only_when_no_shard_collected_any(tmp_path, capsys):
    repo = _fake_repo(tmp_path / "repo", failing=False)
    assert rt.main(["--jobs=2", "-q", "-p", "no:cacheprovider", "-k", "nothing_matches"], repo=repo) == rt.NO_TESTS
    assert rt.main(["--jobs=2", "-q", "-p", "no:cacheprovider", "-k", "test_a"], repo=repo) == 0


def test_jobs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        rt.main(["--jobs=0"])
    assert "--jobs: at least 1" in capsys.readouterr().err


def test_durations_table_lists_only_existing_modules():
    table = rt.load_durations(REPO / rt.DURATIONS_FILE)
    assert table, "tests/durations.json balances the shards of README's test command"
    assert set(table) <= set(rt.test_modules(REPO))
    assert all(v >= 0 for v in table.values())

