r"""A results report over finished runs: tables with a spread over seeds, A_t curves,
accuracy matrices, where each run's time went and, for DGM, the generative memory's
size, free capacity and last sample grid.

    python tools/report.py runs/dgmw_s0 runs/dgmw_s1 runs/mas_s0 --out runs/report
    dgm-tf-report runs/* --out runs/report          # the same, once installed with .[report]

Each RUN_DIR is a ``--workdir`` of ``python -m dgm_tf.main``: its ``flags.txt`` (the
config, written when the run starts) and ``results.json`` (rewritten after every task;
its fields are described in README "Run directory" and WORKSPACE.md). The report goes to
``--out``: ``report.md``, PNG plots beside it and ``samples/`` (copies of each DGM run's
last sample grid). ``--out`` is built in a temporary folder next to it and renamed into
place, so it is never left half written; an existing ``--out`` is replaced only when it
holds a report this tool wrote (or is empty).

What is averaged with what:

* A *scenario* is (dataset, class order, tasks): results.json ``dataset``,
  ``class_order`` and ``tasks``. Each scenario gets one table and one A_t plot.
* A *group* is the finished runs of one scenario whose flags.txt agree on every flag
  except those in ``IGNORED_FLAGS`` (the seed and flags that cannot change a result,
  each with its reason). A group is one table row: mean ± sample sd (n - 1 in the
  denominator) over its runs, n given; a group of one run shows its single value,
  marked as such.
* A run is *finished* when results.json records every task of its scenario
  (``tasks_completed == len(tasks)``). Other runs (no results.json, or fewer tasks)
  are listed as not finished and never enter a mean or a curve.

Bad input (a directory that is not a run, unreadable or malformed JSON or flags) is one
``error: ...`` line on stderr and exit code 2, with nothing written. Only numpy,
matplotlib (the ``report`` extra) and the standard library are imported: no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The first line of every report.md: an --out holding it may be replaced by a new report.
MARKER = "<!-- dgm_tf report: written by tools/report.py; running it again with this --out replaces this folder -->"

# Flags left out when deciding whether two runs are the same experiment, and why none of
# them changes an accuracy. They may move wall time by their own phases only
# (results.json time_breakdown_s: monitoring, checkpoint, samples), which are small.
IGNORED_FLAGS = {
    "seed": "what a group averages over",
    "workdir": "where the run writes (not a Config field; never in flags.txt, ignored if a hand-written one has it)",
    "resume": "continues a run to the same results (tests/test_resume.py); not a Config field",
    "data_dir": "where TFDS finds prepared data: the same dataset in another folder",
    "download": "whether TFDS may download the data; the data read are the same",
    "keep_checkpoints": "how many checkpoints stay on disk (may change on --resume: engine RESUME_MAY_CHANGE)",
    "log_every_steps": "how often TensorBoard logs per-step values (may change on --resume: engine RESUME_MAY_CHANGE)",
    "samples_per_class": "columns of the sample grids, drawn from their own seeded generator (DGM.generate)",
}
# Kept on purpose although they leave accuracy alone or nearly: `export` (the export phase
# is a large share of wall time: 0.9 of 4 s per task in a 1-epoch MAS quickstart) and
# `distribution` (the same update up to float rounding, 1.4-2.3x the wall time on 2 cores;
# README "More than one device").

METHOD_ORDER = ("dgmw", "dgma", "finetune", "joint", "mas")
GENERATIVE_METHODS = ("dgmw", "dgma")

# Pixel sizes of the plots (width, height) at DPI dots per inch: tests check them.
DPI = 100
CURVES_PX = (1100, 450)
MATRIX_PX = (560, 480)
CAPACITY_PX = (1000, 400)

ANNOTATE_MAX_TASKS = 12  # accuracy-matrix cells carry their value up to this many tasks


class ReportError(Exception):
    """Bad input or an unusable --out: one line for the user, exit code 2."""


# -- reading runs -------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    path: pathlib.Path
    flags: dict[str, str]
    results: dict | None  # None: no results.json
    run_id: str = ""

    @property
    def method(self) -> str:
        if self.results is not None:
            return self.results["method"]
        return self.flags.get("method", "?")

    @property
    def seed(self) -> str:
        return self.flags.get("seed", "?")

    @property
    def num_tasks(self) -> int | None:
        return None if self.results is None else len(self.results["tasks"])

    @property
    def tasks_completed(self) -> int:
        return 0 if self.results is None else self.results["tasks_completed"]

    @property
    def finished(self) -> bool:
        return self.results is not None and self.tasks_completed == self.num_tasks

    @property
    def unfinished_reason(self) -> str:
        if self.results is None:
            return "no results.json: no task finished (stopped early, or still running)"
        return f"{self.tasks_completed} of {self.num_tasks} tasks in results.json (stopped, or still running)"

    @property
    def scenario_key(self):
        r = self.results
        return (r["dataset"], tuple(r["class_order"]), tuple(tuple(t) for t in r["tasks"]))

    @property
    def config_key(self):
        # A flag its flags.txt does not name was added after the run: the run ran as its
        # default does (dgm_tf.engine.resume.ADDED_AFTER_RUNS), so it counts as that.
        flags = {**default_flags(), **self.flags}
        return tuple(sorted((k, v) for k, v in flags.items() if k not in IGNORED_FLAGS))

    @property
    def is_generative(self) -> bool:
        return self.method in GENERATIVE_METHODS or any(
            p is not None for p in (self.results or {}).get("generator_params") or []
        )


def default_flags() -> dict[str, str]:
    """Every Config field at its default, as flags.txt writes it (``Config.to_flags``),
    or {} when dgm_tf's config.py cannot be found. config.py is plain Python (standard
    library only); it is loaded from its file under a private name, so the dgm_tf
    package (and TensorFlow) is never imported."""
    global _DEFAULT_FLAGS
    if _DEFAULT_FLAGS is None:
        spec = importlib.util.find_spec("dgm_tf")
        root = pathlib.Path(spec.origin).parent if spec and spec.origin else _REPO_ROOT / "dgm_tf"
        path = root / "config.py"
        _DEFAULT_FLAGS = {}
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("_dgm_tf_report_config", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # dataclasses resolves the class's module
            try:
                module_spec.loader.exec_module(module)
            finally:
                del sys.modules[module_spec.name]
            _DEFAULT_FLAGS = dict(line[2:].partition("=")[::2] for line in module.Config().to_flags())
    return _DEFAULT_FLAGS


_DEFAULT_FLAGS: dict[str, str] | None = None


def parse_flags(path: pathlib.Path) -> dict[str, str]:
    """flags.txt (``Config.to_flags``: a comment line, then ``--name=value`` per line) as
    {name: value}. Bare ``--name`` / ``--noname`` lines (absl's boolean forms) are read
    as true / false."""
    text = _read_text(path)
    flags: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise ReportError(f"{path} line {n}: expected --name=value, got {line[:60]!r}")
        name, sep, value = line[2:].partition("=")
        if not sep:
            name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ReportError(f"{path} line {n}: {name!r} is not a flag name")
        if name in flags and flags[name] != value:
            raise ReportError(f"{path} line {n}: --{name} given twice ({flags[name]!r} and {value!r})")
        flags[name] = value
    if not flags:
        raise ReportError(f"{path}: no flags in it (a run's flags.txt has one --name=value per line)")
    return flags


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_results(path: pathlib.Path, r: Any) -> dict:
    """The fields the report reads, checked for type and length; older results.json
    without the optional fields are accepted (the report says what is missing)."""

    def bad(what):
        return ReportError(f"{path}: {what}")

    if not isinstance(r, dict):
        raise bad(f"expected a JSON object, got {type(r).__name__}")
    for key in ("method", "dataset", "class_order", "tasks", "tasks_completed", "accuracy_matrix", "average_accuracy"):
        if key not in r:
            raise bad(f"has no {key!r}: not a dgm_tf results.json")
    if not isinstance(r["method"], str) or not isinstance(r["dataset"], str):
        raise bad("'method' and 'dataset' must be strings")
    if not isinstance(r["class_order"], list) or not all(isinstance(c, int) for c in r["class_order"]):
        raise bad("'class_order' must be a list of class ids")
    tasks = r["tasks"]
    if (not isinstance(tasks, list) or not tasks
            or not all(isinstance(t, list) and t and all(isinstance(c, int) for c in t) for t in tasks)):
        raise bad("'tasks' must be a non-empty list of non-empty lists of class ids")
    T, done = len(tasks), r["tasks_completed"]
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= T:
        raise bad(f"'tasks_completed' must be an integer in 0..{T}, got {done!r}")

    def curve(key, required=False):
        v = r.get(key)
        if v is None and not required:
            return
        if not isinstance(v, list) or len(v) != done or not all(_is_number(a) and 0 <= a <= 1 for a in v):
            raise bad(f"{key!r} must be {done} accuracies in [0, 1] (one per completed task)")

    def matrix(key, required=False):
        m = r.get(key)
        if m is None and not required:
            return
        if not isinstance(m, list) or len(m) < done:
            raise bad(f"{key!r} must have a row per completed task ({done})")
        for i in range(done):
            row = m[i]
            if not isinstance(row, list) or len(row) < i + 1 or not all(
                _is_number(a) and 0 <= a <= 1 for a in row[: i + 1]
            ):
                raise bad(f"{key!r} row {i} must hold {i + 1} accuracies in [0, 1]")

    curve("average_accuracy", required=True)
    matrix("accuracy_matrix", required=True)
    for key in ("last_epoch_average_accuracy", "best_validation_average_accuracy", "task_aware_average_accuracy"):
        curve(key)
    matrix("task_aware_accuracy_matrix")
    for key in ("average_forgetting", "bwt"):
        if r.get(key) is not None and not _is_number(r[key]):
            raise bad(f"{key!r} must be a number or null")
    for key in ("wall_time_s", "time_breakdown_s", "generator_params", "replay_accuracy", "method_state"):
        if r.get(key) is not None and (not isinstance(r[key], list) or len(r[key]) != done):
            raise bad(f"{key!r} must be a list with one entry per completed task ({done})")
    if r.get("wall_time_s") is not None and not all(_is_number(w) and w >= 0 for w in r["wall_time_s"]):
        raise bad("'wall_time_s' must hold non-negative seconds")
    for t, row in enumerate(r.get("time_breakdown_s") or []):
        # ``other`` (wall time no phase claims) may round to a hair below zero.
        if row is not None and (not isinstance(row, dict) or not all(
                isinstance(k, str) and _is_number(v) for k, v in row.items())):
            raise bad(f"'time_breakdown_s' row {t} must be null or an object of seconds per phase")
    if r.get("generator_params") is not None and not all(
        p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in r["generator_params"]
    ):
        raise bad("'generator_params' must hold integers or null")
    for t, row in enumerate(r.get("replay_accuracy") or []):
        if row is not None and (not isinstance(row, list) or not all(_is_number(a) and 0 <= a <= 1 for a in row)):
            raise bad(f"'replay_accuracy' row {t} must be null or accuracies in [0, 1]")
    if r.get("method_state") is not None and not all(isinstance(s, dict) for s in r["method_state"]):
        raise bad("'method_state' must hold one object per completed task")
    return r


def load_run(path: pathlib.Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (each RUN_DIR is a run's --workdir)")
    flags_file = path / "flags.txt"
    if not flags_file.is_file():
        raise ReportError(f"{path}: not a run directory (no flags.txt; dgm_tf.main writes it when a run starts)")
    flags = parse_flags(flags_file)
    results_file = path / "results.json"
    results = None
    if results_file.exists():
        text = _read_text(results_file)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{results_file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        results = _check_results(results_file, data)
        if "method" in flags and flags["method"] != results["method"]:
            raise ReportError(
                f"{path}: flags.txt says --method={flags['method']} but results.json says {results['method']!r}"
            )
    return Run(path=path, flags=flags, results=results)


def load_runs(paths: Sequence[str], warn: Callable[[str], None]) -> list[Run]:
    runs, seen = [], {}
    for p in paths:
        path = pathlib.Path(p)
        key = path.resolve()
        if key in seen:
            warn(f"{p}: the same directory as {seen[key]}; read once")
            continue
        seen[key] = p
        runs.append(load_run(path))
    taken: set[str] = set()
    for run in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", run.path.resolve().name).strip("._") or "run"
        run_id, k = base, 2
        while run_id in taken:
            run_id, k = f"{base}-{k}", k + 1
        taken.add(run_id)
        run.run_id = run_id
    return runs


# -- what a run reports -------------------------------------------------------------------


def last_epoch_curve(run: Run) -> list[float] | None:
    """A_t of the classifier as each task's last epoch left it. Runs from before
    --restore_best existed (no such flag) kept the last epoch: their average_accuracy."""
    r = run.results
    if r.get("last_epoch_average_accuracy") is not None:
        return r["last_epoch_average_accuracy"]
    if "restore_best" not in run.flags or run.flags["restore_best"] == "false":
        return r["average_accuracy"]
    return None


def best_validation_curve(run: Run) -> list[float] | None:
    """A_t of the classifier at each task's best validation epoch (null when unknown)."""
    return run.results.get("best_validation_average_accuracy")


def kept_classifier(run: Run) -> str:
    if run.flags.get("restore_best") == "true":
        return "best validation epoch (--restore_best)"
    return "last epoch (--norestore_best)" if "restore_best" in run.flags else "last epoch (run from before --restore_best)"


def _last(v):
    return None if not v else v[-1]


# method_state keys that count the real training images a method stores: joint's
# `stored_examples` (every task's data), NISPA's `buffer` (its replay buffer), Dynamos's
# `buffer_filled` (the reservoir's written slots).
STORED_IMAGES_KEYS = ("stored_examples", "buffer", "buffer_filled")


def memory_size(run: Run) -> tuple[float | None, str]:
    """(size, unit) of what the method keeps of the past after the last task: the
    generator's parameters (DGM) or the stored real training images (joint, a buffer)."""
    r = run.results
    state = _last(r.get("method_state")) or {}
    params = _last(r.get("generator_params"))
    if params is None:
        params = state.get("generator_params")
    if params is not None:
        return float(params), "generator params"
    for key in STORED_IMAGES_KEYS:
        if isinstance(state.get(key), int) and not isinstance(state[key], bool):
            return float(state[key]), "stored images"
    return None, ""


def replay_mean(run: Run) -> float | None:
    row = _last(run.results.get("replay_accuracy"))
    return None if not row else float(np.mean(row))


def wall_time(run: Run) -> float | None:
    w = run.results.get("wall_time_s")
    return None if w is None else float(math.fsum(w))


def time_breakdown(run: Run) -> list[tuple[str, float]] | None:
    """Seconds per phase of results.json ``time_breakdown_s`` summed over the tasks
    done, largest first (the phases and ``other`` add up to ``wall_time_s``); None when
    a task has no breakdown (results.json written before it was recorded, or a run
    resumed across that change): the report then has no time table for the run."""
    rows = run.results.get("time_breakdown_s") or []
    if not rows or not all(rows) or len(rows) != len(run.results.get("wall_time_s") or []):
        return None
    totals: dict[str, list[float]] = {}
    for row in rows:
        for phase, seconds in row.items():
            totals.setdefault(phase, []).append(float(seconds))
    return sorted(((phase, math.fsum(v)) for phase, v in totals.items()), key=lambda kv: -kv[1])


# Table columns: (header, value of a run, decimals, signed). {T} is the scenario's task count.
COLUMNS: list[tuple[str, Callable[[Run], float | None], int, bool]] = [
    ("A_{T} last epoch", lambda run: _last(last_epoch_curve(run)), 3, False),
    ("A_{T} best validation", lambda run: _last(best_validation_curve(run)), 3, False),
    ("task-aware A_{T}", lambda run: _last(run.results.get("task_aware_average_accuracy")), 3, False),
    ("avg forgetting", lambda run: run.results.get("average_forgetting"), 3, False),
    ("BWT", lambda run: run.results.get("bwt"), 3, True),
    ("replay accuracy", replay_mean, 3, False),
]


def stat(values: Sequence[float | None], decimals: int, signed: bool = False, unit: str = "") -> str:
    """'mean ± sd' (sample sd, n - 1) of the values present; one value alone; '–' if none.
    Says how many runs had the value when some did not."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return "–"
    mean = float(np.mean(present))
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:,.{decimals}f}"
    if len(present) >= 2:
        text += f" ± {float(np.std(present, ddof=1)):,.{decimals}f}"
    if unit:
        text += f" {unit}"
    if len(present) < len(values):
        text += f" (n={len(present)} of {len(values)})"
    return text


def wall_stat(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    decimals = 0 if present and np.mean(present) >= 100 else 1
    return stat(values, decimals, unit="s")


def memory_stat(runs: Sequence[Run]) -> str:
    sizes = [memory_size(r) for r in runs]
    units = {u for _, u in sizes if u}
    if not units:
        return "–"
    if len(units) > 1:
        return "mixed: " + ", ".join(sorted(units))
    return stat([s for s, _ in sizes], 0, unit=units.pop())


# -- grouping -----------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    gid: str
    scenario_key: tuple
    config_key: tuple
    runs: list[Run]  # finished, sorted by seed
    unfinished: list[Run]
    label: str = ""

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def flags(self) -> dict[str, str]:
        return dict(self.config_key)


@dataclasses.dataclass
class Scenario:
    key: tuple
    index: int
    groups: list[Group]
    runs: list[Run]  # every run with results of this scenario, finished or not

    @property
    def title(self) -> str:
        dataset, order, tasks = self.key
        sizes = sorted({len(t) for t in tasks})
        per = f"{sizes[0]} class{'es' if sizes[0] > 1 else ''}" if len(sizes) == 1 else \
            "classes " + "/".join(str(len(t)) for t in tasks)
        return f"{dataset}, {len(tasks)} tasks x {per}, class order {','.join(str(c) for c in order)}"

    @property
    def num_tasks(self) -> int:
        return len(self.key[2])

    @property
    def slug(self) -> str:
        dataset, _, tasks = self.key
        name = re.sub(r"[^A-Za-z0-9]+", "-", dataset).strip("-")[:40]
        return f"s{self.index}_{name}_{len(tasks)}tasks"


def _seed_sort(run: Run):
    s = run.seed
    return (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s)


def _method_rank(method: str):
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def build_scenarios(runs: Sequence[Run], warn: Callable[[str], None]) -> list[Scenario]:
    scenarios: dict[tuple, Scenario] = {}
    groups: dict[tuple, Group] = {}
    for run in runs:
        if run.results is None:
            continue
        sc = scenarios.setdefault(run.scenario_key, Scenario(run.scenario_key, len(scenarios) + 1, [], []))
        sc.runs.append(run)
        key = (run.scenario_key, run.config_key)
        if key not in groups:
            groups[key] = Group("", run.scenario_key, run.config_key, [], [])
        (groups[key].runs if run.finished else groups[key].unfinished).append(run)
    n = 0
    for sc in scenarios.values():
        members = [g for g in groups.values() if g.scenario_key == sc.key and g.runs]
        members.sort(key=lambda g: _method_rank(g.runs[0].method))
        for g in members:
            n += 1
            g.gid = f"G{n}"
            g.runs.sort(key=_seed_sort)
            seeds = [r.seed for r in g.runs]
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            if dup:
                warn(f"group {g.gid} ({g.method}): seed {', '.join(dup)} appears in more than one run; "
                     "n counts runs, not distinct seeds")
        for g in members:
            g.label = _label(g, [o for o in members if o is not g and o.method == g.method])
        sc.groups = members
    return list(scenarios.values())


def differing_flags(group: Group, others: Sequence[Group]) -> list[str]:
    """The flags on which ``group`` differs from at least one of ``others``."""
    mine = group.flags
    keys = set()
    for o in others:
        theirs = o.flags
        keys |= {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
    return sorted(keys)


def _label(group: Group, same_method: Sequence[Group]) -> str:
    if not same_method:
        return group.method
    flags = group.flags
    keys = differing_flags(group, same_method)
    shown = ", ".join(f"{k}={flags.get(k, '(unset)')}" for k in keys[:3])
    more = f", +{len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{group.method} ({shown}{more})"


# -- plots --------------------------------------------------------------------------------


def _figure(px: tuple[int, int]):
    """A matplotlib Figure drawn by the Agg canvas (no display, no pyplot state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "matplotlib is not installed: pip install 'dgm_tf[report]' (or pip install matplotlib)"
        ) from None
    return Figure(figsize=(px[0] / DPI, px[1] / DPI), dpi=DPI)


def _save(fig, path: pathlib.Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def curve_band(runs: Sequence[Run], get: Callable[[Run], list[float] | None]):
    """(mean, sample sd or None for one run, n) per task of the curves ``get`` gives
    for the (finished) ``runs``; None when no run has the curve."""
    curves = [c for c in (get(r) for r in runs) if c is not None]
    if not curves:
        return None
    a = np.asarray(curves, float)
    return a.mean(axis=0), (a.std(axis=0, ddof=1) if len(a) >= 2 else None), len(a)


def plot_curves(path: pathlib.Path, scenario: Scenario) -> None:
    """A_t per task, every group of the scenario on one axis per panel: mean line, band
    mean ± sample sd (groups of one run: the line alone)."""
    fig = _figure(CURVES_PX)
    T = scenario.num_tasks
    x = np.arange(1, T + 1)
    panels = (("best validation epoch", best_validation_curve), ("last epoch", last_epoch_curve))
    colors = _colors(len(scenario.groups))
    for p, (title, get) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        for g, color in zip(scenario.groups, colors):
            band = curve_band(g.runs, get)
            if band is None:
                continue
            mean, sd, n = band
            ax.plot(x, mean, marker="o", ms=3, color=color, label=f"{g.label} [{g.gid}] (n={n})")
            if sd is not None:
                ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"A_t at the {title}", fontsize=10)
        ax.set_xlabel("after task t")
        ax.set_ylabel("A_t (class-incremental)")
        ax.set_xlim(0.5, T + 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(x if T <= 20 else np.linspace(1, T, 10).round().astype(int))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not in results.json", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(_short(scenario.title, 110), fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.86, wspace=0.2)
    _save(fig, path)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_matrix(path: pathlib.Path, run: Run) -> None:
    """accuracy_matrix (the kept classifier) as a heatmap: row i after task i, column j
    the test accuracy on task j's classes; blank above the diagonal and for tasks not run."""
    from matplotlib import colormaps

    r = run.results
    T = len(r["tasks"])
    m = np.full((T, T), np.nan)
    for i in range(r["tasks_completed"]):
        m[i, : i + 1] = r["accuracy_matrix"][i][: i + 1]
    fig = _figure(MATRIX_PX)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if T <= ANNOTATE_MAX_TASKS:
        for i in range(T):
            for j in range(i + 1):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7 if T > 6 else 9,
                            color="white" if m[i, j] < 0.6 else "black")
    ticks = np.arange(T) if T <= 20 else np.linspace(0, T - 1, 10).round().astype(int)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("test accuracy on task j")
    ax.set_ylabel("after task i")
    status = "" if run.finished else f", not finished: {run.tasks_completed} of {T} tasks"
    ax.set_title(_short(f"{run.run_id}: {run.method}, seed {run.seed}{status}", 70), fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.92, bottom=0.1, top=0.92)
    _save(fig, path)


def capacity_series(run: Run) -> tuple[list[float | None], list[list[float]] | None, list[str]]:
    """(generator params per task, free fraction per masked layer per task or None,
    notes on what results.json does not hold)."""
    r = run.results
    states = r.get("method_state") or [{}] * r["tasks_completed"]
    params = r.get("generator_params") or [s.get("generator_params") for s in states]
    notes = []
    if all(p is None for p in params):
        notes.append("generator size: not in results.json (no generator_params)")
    reserved = [s.get("reserved_fraction") for s in states]
    free = None
    if reserved and all(isinstance(v, list) and v and all(_is_number(a) for a in v) for v in reserved) \
            and len({len(v) for v in reserved}) == 1:
        free = [[1.0 - a for a in v] for v in reserved]
    else:
        notes.append("free capacity: not in results.json (method_state has no reserved_fraction for every task)")
    return params, free, notes


def plot_capacity(path: pathlib.Path, run: Run) -> list[str]:
    """Generator parameters and each masked layer's free fraction per task (DGM runs)."""
    params, free, notes = capacity_series(run)
    fig = _figure(CAPACITY_PX)
    x = np.arange(1, len(params) + 1)
    ax = fig.add_subplot(1, 2, 1)
    if any(p is not None for p in params):
        ax.plot(x, [np.nan if p is None else p for p in params], marker="o")
        ax.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.5, "not in results.json", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("generator parameters after each task", fontsize=10)
    ax.set_xlabel("task")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    if free is not None:
        f = np.asarray(free)
        for layer in range(f.shape[1]):
            ax.plot(x, f[:, layer], marker="o", label=f"masked layer {layer + 1}")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not in results.json", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_title("free fraction per masked layer (end of task, before growth)", fontsize=10)
    ax.set_xlabel("task")
    ax.grid(alpha=0.3)
    for a in fig.axes:
        if len(x):
            a.set_xticks(x if len(x) <= 20 else np.linspace(1, len(x), 10).round().astype(int))
    fig.suptitle(_short(f"{run.run_id}: {run.method}, seed {run.seed}", 100), fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.85, wspace=0.25)
    _save(fig, path)
    return notes


def last_sample_grid(run: Run) -> pathlib.Path | None:
    grids = sorted((run.path / "samples").glob("task_*.png"),
                   key=lambda p: int(m.group(1)) if (m := re.fullmatch(r"task_(\d+)\.png", p.name)) else -1)
    return grids[-1] if grids else None


# -- report.md ----------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows
    ]


def _n_cell(g: Group) -> str:
    seeds = ", ".join(r.seed for r in g.runs)
    text = f"{len(g.runs)} (single run, seed {seeds})" if len(g.runs) == 1 else f"{len(g.runs)} (seeds {seeds})"
    if g.unfinished:
        text += f"; {len(g.unfinished)} unfinished left out"
    return text


def group_row(g: Group) -> list[str]:
    row = [f"{g.label} [{g.gid}]", _n_cell(g)]
    for _, get, decimals, signed in COLUMNS:
        row.append(stat([get(r) for r in g.runs], decimals, signed))
    row.append(memory_stat(g.runs))
    row.append(wall_stat([wall_time(r) for r in g.runs]))
    return row


def table_header(T: int) -> list[str]:
    return ["method [group]", "n"] + [h.format(T=T) for h, *_ in COLUMNS] + ["memory after the last task", "wall time"]


LEGEND = """\
How to read the tables. Each row is a group: finished runs of the scenario whose flags.txt
agree on every flag but those listed under "Grouping". Values are mean ± sd over the
group's runs, the sd being the sample standard deviation (n − 1 in the denominator); n
says how many runs (seeds) a row averages, and a row with n = 1 shows that single run's
value, without ±. T is the scenario's number of tasks; A_T is the class-incremental
accuracy over all classes seen after the last task (results.json `average_accuracy`).

- *A_T last epoch*: the classifier as each task's last epoch left it
  (`last_epoch_average_accuracy`; the reference's harness keeps this one).
- *A_T best validation*: the classifier at each task's best validation epoch
  (`best_validation_average_accuracy`; the figure the reference reports).
- *task-aware A_T*, *avg forgetting* (Chaudhry et al. 2018) and *BWT* (Lopez-Paz & Ranzato
  2017): of the classifier each task kept and exported (`task_aware_average_accuracy`,
  `average_forgetting`, `bwt`): the best validation epoch's with `--restore_best` (default),
  else the last epoch's. With one class per task task-aware accuracy is 1 by construction.
- *replay accuracy*: after the last task, the classifier's accuracy on generated images of
  each seen class, averaged over the classes (`replay_accuracy`; generative methods only).
- *memory after the last task*: the generator's parameter count (DGM, `generator_params`)
  or the real training images stored (joint: `method_state.stored_examples`; a replay
  buffer: `method_state.buffer`, Dynamos's `method_state.buffer_filled`).
- *wall time*: the sum of the per-task `wall_time_s` (start-up and data loading before the
  first task are not counted).
- Curves: mean A_t per task, the band ± 1 sample sd over the group's runs (no band for n = 1).
"""


def write_report(out: pathlib.Path, runs: Sequence[Run], scenarios: Sequence[Scenario], warnings: Sequence[str]) -> None:
    finished = [r for r in runs if r.finished]
    unfinished = [r for r in runs if not r.finished]
    group_of = {r.run_id: g for sc in scenarios for g in sc.groups for r in g.runs + g.unfinished}
    lines = [
        MARKER,
        "# dgm_tf results report",
        "",
        f"{_count(len(runs), 'run')} read: {len(finished)} finished, in "
        f"{_count(sum(len(sc.groups) for sc in scenarios), 'group')} over {_count(len(scenarios), 'scenario')}; "
        f"{len(unfinished)} not finished (listed under \"Runs not finished\", left out of every "
        "table and curve). Every run is listed under \"All runs\".",
        "",
        LEGEND,
    ]
    for w in warnings:
        lines.append(f"**Warning:** {w}")
    if warnings:
        lines.append("")
    (out / "samples").mkdir()
    for sc in scenarios:
        T = sc.num_tasks
        lines += [f"## Scenario {sc.index}: {sc.title}", ""]
        if sc.groups:
            lines += _md_table(table_header(T), [group_row(g) for g in sc.groups]) + [""]
            curves = f"curves_{sc.slug}.png"
            plot_curves(out / curves, sc)
            lines += [f"![A_t per task, scenario {sc.index}]({curves})", ""]
        else:
            lines += ["No finished run of this scenario.", ""]
        left_out = [r for r in sc.runs if not r.finished]
        if left_out:
            lines.append("Not finished, left out of the table and curves: " + "; ".join(
                f"`{r.run_id}` ({r.method}, seed {r.seed}: {r.tasks_completed} of {T} tasks)" for r in left_out) + ".")
            lines.append("")
        if sc.groups:
            lines += ["### Groups", ""]
            for g in sc.groups:
                same = [o for o in sc.groups if o is not g and o.method == g.method]
                lines.append(
                    f"- **{g.gid}** {g.label}: n = {len(g.runs)}, runs "
                    + ", ".join(f"`{r.run_id}` (seed {r.seed})" for r in g.runs)
                    + f"; kept classifier: {kept_classifier(g.runs[0])}."
                )
                if same:
                    keys = differing_flags(g, same)
                    lines.append("  Differs from the other " + g.method + " groups in: "
                                 + ", ".join(f"`--{k}={g.flags.get(k, '(unset)')}`" for k in keys) + ".")
                lines.append("  <details><summary>flags (seed and ignored flags left out)</summary>")
                lines.append("")
                lines.append("  " + " ".join(f"`--{k}={v}`" for k, v in g.config_key))
                lines.append("  </details>")
            lines.append("")
        lines += ["### Runs", ""]
        ordered = [r for g in sc.groups for r in g.runs] + left_out
        for run in ordered:
            lines += _run_section(out, run, group_of.get(run.run_id))
    lines += ["## Runs not finished", ""]
    if unfinished:
        lines += _md_table(
            ["run", "directory", "method", "seed", "tasks done", "why"],
            [[r.run_id, str(r.path), r.method, r.seed,
              f"{r.tasks_completed} of {r.num_tasks}" if r.results else "0 (no results.json)",
              r.unfinished_reason] for r in unfinished],
        )
    else:
        lines.append("None.")
    lines += ["", "## All runs", ""]
    lines += _md_table(
        ["run", "directory", "method", "seed", "group", "tasks done", "A_T kept", "wall time"],
        [[r.run_id, str(r.path), r.method, r.seed,
          group_of[r.run_id].gid if r.run_id in group_of and group_of[r.run_id].gid else "–",
          f"{r.tasks_completed} of {r.num_tasks}" if r.results else "0 (no results.json)",
          f"{r.results['average_accuracy'][-1]:.3f}" if r.results and r.results["average_accuracy"] else "–",
          wall_stat([wall_time(r)]) if r.results else "–"] for r in runs],
    )
    lines += ["", "## Grouping", "",
              "Runs of one scenario are one group when their flags.txt agree on every flag except these, "
              "none of which changes an accuracy (they may move wall time by their own phases: monitoring, "
              "checkpoint, samples in results.json `time_breakdown_s`):", ""]
    lines += [f"- `--{k}`: {why}" for k, why in IGNORED_FLAGS.items()]
    lines += ["", "`--export` and `--distribution` do not change accuracy (distribution: up to float rounding) "
              "but do change wall time a lot, so runs that differ in them stay apart.", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run_section(out: pathlib.Path, run: Run, group: Group | None) -> list[str]:
    gid = f", {group.gid}" if group is not None and group.gid else ""
    status = "" if run.finished else f", not finished ({run.tasks_completed} of {run.num_tasks} tasks)"
    lines = [f"#### `{run.run_id}`: {run.method}, seed {run.seed}{gid}{status}", "", f"Directory: `{run.path}`.", ""]
    if run.tasks_completed:
        matrix = f"matrix_{run.run_id}.png"
        plot_matrix(out / matrix, run)
        lines += [f"![accuracy matrix of {run.run_id}]({matrix})", ""]
    phases = time_breakdown(run) if run.tasks_completed else None
    wall = wall_time(run)
    if phases and wall:
        lines += [f"Where the time went (results.json `time_breakdown_s`, summed over {run.tasks_completed} "
                  f"task(s), {wall:.1f} s of wall time):", ""]
        lines += _md_table(["phase", "seconds", "share of wall time"],
                           [[f"`{phase}`", f"{seconds:.1f}", f"{100 * seconds / wall:.1f} %"] for phase, seconds in phases])
        steps = dict(phases).get("iterations")
        if steps is not None:
            # Issue 23's measure: all but the training steps after each task's first.
            lines += ["", f"Not training steps (wall time less `iterations`): {100 * (wall - steps) / wall:.1f} %.", ""]
        else:
            lines.append("")
    if run.is_generative:
        capacity = f"capacity_{run.run_id}.png"
        notes = plot_capacity(out / capacity, run)
        params, free, _ = capacity_series(run)
        lines += [f"![generator size and free capacity of {run.run_id}]({capacity})", ""]
        lines.append("Generator parameters after each task: "
                     + ", ".join("?" if p is None else f"{p:,}" for p in params) + ".")
        if free is not None:
            lines.append(
                "Free fraction of each masked layer after the last task (1 − `method_state.reserved_fraction`: "
                "of its weights for DGMw, of its channels for DGMa; at the end of the task, before the next "
                "task's growth, as the free capacity after growth is not recorded): "
                + ", ".join(f"layer {i + 1}: {f:.3f}" for i, f in enumerate(free[-1])) + ".")
        for note in notes:
            lines.append(f"Missing: {note}.")
        grid = last_sample_grid(run)
        if grid is None:
            lines.append("Missing: no sample grid in samples/.")
            lines.append("")
        else:
            name = f"samples/{run.run_id}_{grid.name}"
            try:
                shutil.copyfile(grid, out / name)
            except OSError as e:
                raise ReportError(f"{grid}: cannot copy: {e.strerror or e}") from None
            lines += ["", f"Last sample grid ({grid.name}: one row per class seen, in class order):", "",
                      f"![samples of {run.run_id}]({name})", ""]
    return lines


# -- writing --out without ever leaving it half written ----------------------------------


def _replaceable(out: pathlib.Path) -> bool:
    """An --out that may be replaced: absent, an empty folder, or a report of this tool."""
    if not out.exists() and not out.is_symlink():
        return True
    if not out.is_dir() or out.is_symlink():
        return False
    if not any(out.iterdir()):
        return True
    try:
        with open(out / "report.md", encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _not_replaceable(out: pathlib.Path) -> ReportError:
    return ReportError(f"--out {out}: exists and is not a report written by tools/report.py; "
                       "give a new or empty folder (nothing was written)")


def build(run_dirs: Sequence[str], out: pathlib.Path, warn: Callable[[str], None]) -> tuple[list[Run], list[Scenario]]:
    """Reads every run (all checks before anything is written), writes the report into a
    temporary folder beside ``out`` and renames it into place."""
    warnings: list[str] = []

    def note(message):
        warnings.append(message)
        warn(message)

    out = pathlib.Path(os.path.abspath(out))  # "." or "x/.." have a name and a parent this way
    runs = load_runs(run_dirs, note)
    scenarios = build_scenarios(runs, note)
    _figure((10, 10))  # matplotlib importable, before anything is written
    if not _replaceable(out):
        raise _not_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create: {e.strerror or e}") from None
    try:
        write_report(tmp, runs, scenarios, warnings)
        os.chmod(tmp, 0o755 & ~_umask())
        if not _replaceable(out):  # changed while we wrote
            raise _not_replaceable(out)
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "report")  # the old report until the new one is in place
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old / "report", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write: {e.strerror or e} (nothing was changed)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return runs, scenarios


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's usage block is on --help)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="dgm-tf-report",
        description="Report (report.md and PNG plots) over dgm_tf run directories: a table per scenario with "
        "mean ± sd over seeds, A_t curves, accuracy matrices, DGM generator size, free capacity and samples.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --workdir (flags.txt, results.json)")
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="folder for report.md and the plots (new, empty, or an earlier report: replaced)")
    args = parser.parse_args(argv)
    try:
        runs, scenarios = build(args.run_dirs, args.out, lambda m: print(f"warning: {m}", file=sys.stderr))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = sum(r.finished for r in runs)
    print(f"wrote {args.out / 'report.md'}: {_count(len(runs), 'run')} ({done} finished, {len(runs) - done} not), "
          f"{_count(sum(len(s.groups) for s in scenarios), 'group')}, {_count(len(scenarios), 'scenario')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
