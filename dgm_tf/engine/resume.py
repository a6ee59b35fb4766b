"""Resuming a run in its workdir: ``check_resume`` refuses flags that change the
experiment (before any data is read), ``resume_checkpoint`` restores the method, and a
mid-task checkpoint's ``ValidationSelection``, from the newest usable checkpoint after
comparing the data fingerprint, and ``_rows_before_restore_best`` fills in the result
rows a checkpoint written before ``--restore_best`` lacks.
"""

from __future__ import annotations

import pathlib

from absl import logging

from dgm_tf.checkpoint import RESTORE_ERRORS, Checkpoint, CheckpointError, CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.data import Scenario, fingerprint_differences, scenario_fingerprint
from dgm_tf.engine.callbacks import ValidationSelection, epoch_budget
from dgm_tf.methods.base import ContinualMethod
from dgm_tf.workdir import WorkdirError

# Config fields a resumed run may change: they do not change what is computed.
# --distribution too: every strategy makes one device's update (dgm_tf/replica.py), so
# a run may move to more devices or back (float rounding aside).
RESUME_MAY_CHANGE = frozenset({"log_every_steps", "keep_checkpoints", "distribution"})
# Fields added after runs were written. A flags.txt that does not name one is of a run
# that predates it: it reads as the default, and the run may be resumed with either
# value (its finished tasks ran as the code then did; results.json says how).
# The NISPA flags change only --method=nispa, which no run before them could use.
ADDED_AFTER_RUNS = frozenset({
    "restore_best", "nispa_network", "nispa_heads", "replay_buffer", "nispa_density", "nispa_hidden",
    "nispa_phase_epochs", "nispa_lr", "nispa_k", "nispa_a_f", "nispa_min_phases",
    # The Dynamos flags change only --method=dynamos, likewise.
    "dynamos_buffer_batch", "dynamos_lr", "dynamos_alpha", "dynamos_beta", "dynamos_policy_alpha",
    "dynamos_policy_penalty", "dynamos_reward_weight", "dynamos_prototype_weight", "dynamos_keep_ratio",
    "dynamos_nf", "dynamos_warmup",
    # --critic: runs before it had the only critic there was, its default.
    "critic",
})


def _named_flags(text: str) -> set[str]:
    return {line.strip().partition("=")[0].lstrip("-") for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")}


def check_resume(workdir: pathlib.Path, config: Config) -> None:
    """Refuse to resume into a workdir of another experiment, listing the differences."""
    flags_path = workdir / "flags.txt"
    if not workdir.is_dir():
        raise WorkdirError(f"--workdir={workdir}: does not exist; nothing to resume (drop --resume to start)")
    if not flags_path.is_file():
        raise WorkdirError(f"--workdir={workdir}: has no flags.txt, so it holds no run to resume")
    try:
        text = flags_path.read_text()
        stored = Config.from_flags_text(text)
    except (OSError, ConfigError) as e:
        raise WorkdirError(f"{flags_path}: cannot read the run's flags ({e})") from None
    old, new = stored.as_dict(), config.as_dict()
    free = RESUME_MAY_CHANGE | (ADDED_AFTER_RUNS - _named_flags(text))
    changed = [k for k in old if old[k] != new[k] and k not in free]
    if changed:
        diffs = "; ".join(f"--{k}: run has {old[k]!r}, now {new[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: the flags change the experiment in {workdir} ({diffs}); resume with the run's own "
            f"flags (--flagfile={flags_path}) or start a new --workdir"
        )


def resume_checkpoint(
    checkpoints: CheckpointManager, method: ContinualMethod, scenario: Scenario, config: Config, path: pathlib.Path
) -> Checkpoint | None:
    """Restore ``method`` from the newest usable checkpoint and return it (``restored``:
    the task's ``ValidationSelection`` for a mid-task checkpoint, else None), or None
    when ``ckpt/`` holds no checkpoint and no task was completed (the run starts over).

    A checkpoint that does not load or does not restore (a missing key, a changed
    shape) is skipped with a warning naming it and why, for the previous one. Nothing
    is written here, so a refusal leaves the workdir as it was.

    Raises:
        CheckpointError: checkpoints exist but none can be used (each named, with why),
            or none exists although results.json records completed tasks.
        ConfigError: the run's data differ from the data now (what changed is named).
    """
    fingerprint = scenario_fingerprint(scenario)

    def restore(checkpoint: Checkpoint):
        st = checkpoint.state
        recorded = st.get("data")
        if recorded is None:
            logging.warning("%s records no data fingerprint (an older version wrote it): data not compared",
                            checkpoint.path)
        else:
            changed = fingerprint_differences(recorded, fingerprint)
            if changed:
                raise ConfigError(
                    f"--resume: the data of the run in {path} changed ({'; '.join(changed)}); resume it with "
                    "the data it started with, or start a new --workdir"
                )
        st["engine"], st["monitor"], st["task_elapsed_s"]  # noqa: B018 (KeyError: skip this checkpoint)
        if st["phase"] == "task_end":
            method.restore_checkpoint(st["method"], checkpoint.arrays, checkpoint.shared, task=None)
            return None
        task = scenario.tasks[st["task"]]
        method.restore_checkpoint(st["method"], checkpoint.arrays, checkpoint.shared, task=task)
        budget, _ = epoch_budget(method, task, config.epochs)  # after the restore: the method's own count
        selection = ValidationSelection(method, scenario.tasks[: task.index + 1], config.eval_every, budget)
        selection.restore(st["selection"], checkpoint.arrays)
        return selection

    import tensorflow as tf

    found = checkpoints.restore_newest(restore, errors=RESTORE_ERRORS + (tf.errors.OpError,))
    if found is None and (path / "results.json").exists():
        raise CheckpointError(
            checkpoints.directory,
            "holds no checkpoint but results.json records completed tasks, so a resume would start the run "
            "over and overwrite them; nothing was changed; restore ckpt/ from a backup or start a new --workdir",
        )
    return found


def _rows_before_restore_best(rows: dict, config: Config, path: pathlib.Path) -> None:
    """Fill in the rows a checkpoint written before ``--restore_best`` lacks: its
    finished tasks kept, evaluated and exported their last epoch's classifier."""
    done = len(rows["acc"])
    rows["last_acc"] = [list(r) for r in rows["acc"]]
    rows["last_aware"] = [list(r) for r in rows["aware"]]
    rows["best_epoch"] = [None] * done
    rows["selected_epoch"] = [config.epochs] * done
    if done:
        logging.warning(
            "%s predates --restore_best: its %d finished task(s) kept their last epoch's classifier "
            "(results.json selected_epoch); the remaining tasks %s", path, done,
            "restore the best validation epoch's" if config.restore_best else "keep the last epoch's",
        )
