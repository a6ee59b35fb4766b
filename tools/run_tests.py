"""Run the test suite on every core: README's test command (``make test``).

Most of the suite's time is one Python thread tracing TensorFlow functions, so a
single pytest process leaves the second core of a 2-core machine idle most of the
time. This runner splits the test modules into ``--jobs`` shards, runs one pytest
process per shard at the same time and reports them together; the exit status is
pytest's (non-zero if any shard failed).

    python tools/run_tests.py                 # the default suite (pyproject's addopts)
    python tools/run_tests.py -m slow         # any pytest option is passed to every shard
    python tools/run_tests.py --jobs=1        # one plain pytest process
    python tools/run_tests.py tests/test_export.py -k serving   # paths: one process, as given

Shards hold whole modules (module fixtures are built once; modules sharing a costly
session fixture, SHARED_FIXTURES, stay together), balanced by each module's
measured seconds in ``tests/durations.json`` (longest first onto the least loaded
shard); a module the table does not know counts as the median. The table only
balances the shards: a stale one makes the run slower, never wrong.
``--update_durations`` rewrites it from this run's times (pytest's JUnit report).

Each shard's output goes to a file and is printed when the shard ends, whole if it
failed, its last lines if it passed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parent.parent
DURATIONS_FILE = "tests/durations.json"
NO_TESTS = 5  # pytest's exit status when a selection collects nothing
# Session fixtures that cost a whole run to build (tests/conftest.py's ``dgm_cli_run``
# trains a 3-task DGMw through the CLI): the modules that name one go to one shard, so
# the fixture is built once, not once per process.
SHARED_FIXTURES = ("dgm_cli_run",)


def default_jobs() -> int:
    """One shard per core, at most 4: each shard is a TensorFlow process of about 1.5 GB."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def test_modules(repo: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(repo).as_posix() for p in (repo / "tests").glob("test_*.py"))


def load_durations(path: pathlib.Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())["seconds"]
        return {str(k): float(v) for k, v in table.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"run_tests: {path} unreadable ({e}); shards balanced by module count", file=sys.stderr)
        return {}


def together(repo: pathlib.Path, modules: list[str]) -> list[list[str]]:
    """Groups of modules that must share a shard: those naming the same fixture of
    ``SHARED_FIXTURES``."""
    groups = []
    for fixture in SHARED_FIXTURES:
        group = [m for m in modules if fixture in (repo / m).read_text(errors="replace")]
        if len(group) > 1:
            groups.append(group)
    return groups


def shard(modules: list[str], seconds: dict[str, float], jobs: int,
          groups: list[list[str]] = ()) -> list[list[str]]:
    """Longest processing time first: each unit (a module, or a group of ``groups``
    that must stay together), heaviest first, onto the shard with the least time so
    far. Deterministic (ties by name and shard index)."""
    known = [seconds[m] for m in modules if m in seconds]
    default = statistics.median(known) if known else 1.0
    weight = {m: seconds.get(m, default) for m in modules}
    units, grouped = [], set()
    for group in groups:
        unit = sorted(set(group) & set(modules) - grouped)
        if unit:
            units.append(unit)
            grouped.update(unit)
    units += [[m] for m in modules if m not in grouped]
    shards: list[list[str]] = [[] for _ in range(jobs)]
    load = [0.0] * jobs
    for unit in sorted(units, key=lambda u: (-sum(weight[m] for m in u), u[0])):
        k = min(range(jobs), key=lambda i: (load[i], i))
        shards[k].extend(unit)
        load[k] += sum(weight[m] for m in unit)
    return [sorted(s) for s in shards if s]


def module_seconds(junit_files: list[pathlib.Path]) -> dict[str, float]:
    """Seconds per test module (setup, call and teardown) from pytest's JUnit reports."""
    out: dict[str, float] = {}
    for path in junit_files:
        if not path.is_file():
            continue
        for case in ET.parse(path).iter("testcase"):
            module = case.get("classname", "").split(".")
            # classname is "tests.test_x" or "tests.test_x.TestClass"
            name = next((f"tests/{part}.py" for part in module if part.startswith("test_")), None)
            if name:
                out[name] = out.get(name, 0.0) + float(case.get("time") or 0.0)
    return out


def _selects_paths(args: list[str]) -> bool:
    """True when the pytest arguments name test files or node ids themselves."""
    return any(not a.startswith("-") and (a.endswith(".py") or "::" in a or pathlib.Path(a).exists()) for a in args)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def main(argv: list[str] | None = None, repo: pathlib.Path = REPO) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Every other argument goes to pytest.",
    )
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="pytest processes at once (default: cores, at most 4)")
    parser.add_argument("--update_durations", action="store_true", help="rewrite tests/durations.json from this run")
    ours, pytest_args = parser.parse_known_args(argv)
    if ours.jobs < 1:
        parser.error(f"--jobs: at least 1, got {ours.jobs}")
    base = [sys.executable, "-m", "pytest"]
    if ours.jobs == 1 or _selects_paths(pytest_args):
        return subprocess.call(base + pytest_args, cwd=repo)

    durations = repo / DURATIONS_FILE
    modules = test_modules(repo)
    groups = shard(modules, load_durations(durations), ours.jobs, together(repo, modules))
    with tempfile.TemporaryDirectory(prefix="dgm_tf_tests_") as tmp:
        tmp = pathlib.Path(tmp)
        procs = []
        for k, group in enumerate(groups):
            log = open(tmp / f"shard{k}.log", "w")
            cmd = base + pytest_args + [f"--junitxml={tmp / f'shard{k}.xml'}"] + group
            procs.append((k, group, log, subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT)))
        print(f"run_tests: {len(groups)} pytest processes, "
              + "; ".join(f"shard {k}: {len(g)} modules" for k, g, _, _ in procs), flush=True)
        start = time.monotonic()
        codes: dict[int, int] = {}
        try:
            pending = list(procs)
            while pending:
                time.sleep(0.5)
                for item in list(pending):
                    k, group, log, proc = item
                    if proc.poll() is None:
                        continue
                    pending.remove(item)
                    log.close()
                    codes[k] = proc.returncode
                    text = (tmp / f"shard{k}.log").read_text(errors="replace")
                    ok = proc.returncode in (0, NO_TESTS)
                    print(f"\n===== shard {k} ({len(group)} modules) exit {proc.returncode} "
                          f"after {time.monotonic() - start:.0f}s =====", flush=True)
                    print(_tail(text, 25) if ok else text, flush=True)
        except KeyboardInterrupt:
            for _, _, _, proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for _, _, _, proc in procs:
                proc.wait()
            return 130
        seconds = module_seconds([tmp / f"shard{k}.xml" for k in range(len(groups))])
        print(f"\nrun_tests: all shards done in {time.monotonic() - start:.0f}s "
              f"(module seconds summed: {sum(seconds.values()):.0f})", flush=True)
        if ours.update_durations and seconds:
            table = {m: s for m, s in load_durations(durations).items() if m in modules}
            table.update({m: round(s, 1) for m, s in seconds.items()})
            durations.write_text(json.dumps({
                "about": "seconds per test module, default suite; only balances tools/run_tests.py's shards",
                "seconds": dict(sorted(table.items())),
            }, indent=1) + "\n")
            print(f"run_tests: wrote {durations}")
    failed = [c for c in codes.values() if c not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
