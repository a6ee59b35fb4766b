r"""Time two commands against each other, alternating, so machine drift hits both alike.

    python tools/alternate_timing.py --rounds=3 --output=side_by_side.json \
        --a_name=reference --a="cd ../machine-learning-dgm && python main.py ..." \
        --b_name=dgm_tf --b=".venv/bin/python -m dgm_tf.main --flagfile=... --workdir=/tmp/r_{round}"

Round r runs A then B when r is even and B then A when r is odd (an ABBA sequence): a
machine that slows down or speeds up steadily over the measurement penalises both
alike, where one run after the other (README, Performance: a single pair) gives the
later command all the drift. ``{round}`` in a command is replaced by the round number,
so each run can get its own work directory. Each command runs through ``bash -c``;
a failing command stops the measurement with its exit code and the tail of its output.

Reported per round: both wall times and the ratio A / B (above 1: B is faster); over
the rounds: median and mean ± sample sd of each, and of the ratio. Speed figures live
in tools and README, never in unit tests.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("a", None, "First command (e.g. the reference's run).")
flags.DEFINE_string("b", None, "Second command (e.g. dgm_tf's run).")
flags.DEFINE_string("a_name", "a", "Name of the first command in the report.")
flags.DEFINE_string("b_name", "b", "Name of the second command in the report.")
flags.DEFINE_integer("rounds", 3, "Rounds; each runs both commands once, in alternating order.")
flags.DEFINE_string("output", "alternate_timing.json", "Where to write the JSON report.")
flags.DEFINE_integer("timeout", 0, "Seconds one command may take (0: no limit).")

FLAGS = flags.FLAGS


def round_order(r: int) -> tuple[str, str]:
    """The order of the two commands in round ``r`` (ABBA...)."""
    return ("a", "b") if r % 2 == 0 else ("b", "a")


def run_timed(command: str, timeout: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=timeout or None)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"command exited with {proc.returncode}: {command}\n{tail}")
    return seconds


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise(rounds: list[dict], names: dict[str, str]) -> dict:
    """Spreads of both commands' wall times and of the per-round ratio a / b."""
    a = [r["a_s"] for r in rounds]
    b = [r["b_s"] for r in rounds]
    ratios = [r["a_s"] / r["b_s"] for r in rounds]
    return {"a": {"name": names["a"], **spread(a)}, "b": {"name": names["b"], **spread(b)},
            "ratio_a_over_b": spread(ratios)}


def measure(commands: dict[str, str], rounds: int, timeout: int = 0, log=print) -> list[dict]:
    out = []
    for r in range(rounds):
        row = {"round": r, "order": "".join(round_order(r))}
        for key in round_order(r):
            row[f"{key}_s"] = run_timed(commands[key].replace("{round}", str(r)), timeout)
            log(f"round {r}: {key} {row[f'{key}_s']:.1f} s")
        out.append(row)
    return out


def main(argv):
    del argv
    if not FLAGS.a or not FLAGS.b:
        raise app.UsageError("--a and --b: give both commands")
    if FLAGS.rounds < 1:
        raise app.UsageError(f"--rounds: must be >= 1, got {FLAGS.rounds}")
    names = {"a": FLAGS.a_name, "b": FLAGS.b_name}
    try:
        rounds = measure({"a": FLAGS.a, "b": FLAGS.b}, FLAGS.rounds, FLAGS.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = summarise(rounds, names)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "commands": {names["a"]: FLAGS.a, names["b"]: FLAGS.b},
        "rounds": rounds,
        "summary": summary,
    }
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if model:
            report["machine"]["cpu"] = model
    except OSError:
        pass
    with open(FLAGS.output, "w") as f:
        json.dump(report, f, indent=2)
    ratio = summary["ratio_a_over_b"]
    sd = "" if ratio["sd"] is None else f" ± {ratio['sd']:.3f}"
    print(f"{names['a']}: median {summary['a']['median']:.1f} s; {names['b']}: median {summary['b']['median']:.1f} s; "
          f"{names['a']} / {names['b']} per round: mean {ratio['mean']:.3f}{sd} over {len(rounds)} rounds "
          f"(above 1: {names['b']} is faster); wrote {FLAGS.output}")
    return 0


if __name__ == "__main__":
    app.run(main)
