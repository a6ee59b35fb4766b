"""tools/alternate_timing.py: the ABBA order, the per-round ratio and its spread (no speed
assertions: the commands here only record when they ran)."""

import json
import subprocess
import sys

from tests.test_cli import REPO


def test_rounds_alternate_and_the_ratio_is_each_rounds_own(tmp_path):
    trace = tmp_path / "trace.txt"
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, "tools/alternate_timing.py", "--rounds=4", f"--output={out}",
         "--a_name=slow", f"--a=sleep 0.3; echo a{{round}} >> {trace}",
         "--b_name=fast", f"--b=echo b{{round}} >> {trace}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # ABBA: round 0 a then b, round 1 b then a, ...; {round} replaced in each command.
    assert trace.read_text().split() == ["a0", "b0", "b1", "a1", "a2", "b2", "b3", "a3"]
    report = json.loads(out.read_text())
    rounds = report["rounds"]
    assert [r["order"] for r in rounds] == ["ab", "ba", "ab", "ba"]
    assert all(r["a_s"] >= 0.3 for r in rounds)
    ratios = [r["a_s"] / r["b_s"] for r in rounds]
    summary = report["summary"]
    assert summary["a"]["name"] == "slow" and summary["b"]["name"] == "fast"
    assert abs(summary["ratio_a_over_b"]["mean"] - sum(ratios) / 4) < 1e-12
    assert summary["ratio_a_over_b"]["min"] == min(ratios) and summary["ratio_a_over_b"]["sd"] is not None
    assert "slow / fast per round" in proc.stdout


def test_a_failing_command_stops_with_its_exit_code_and_writes_nothing(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, "tools/alternate_timing.py", "--rounds=2", f"--output={out}",
         "--a=true", "--b=echo broken data; exit 3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "command exited with 3" in proc.stderr and "broken data" in proc.stderr
    assert not out.exists()


def test_both_commands_are_required(tmp_path):
    proc = subprocess.run([sys.executable, "tools/alternate_timing.py", "--a=true"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--a and --b" in proc.stderr
