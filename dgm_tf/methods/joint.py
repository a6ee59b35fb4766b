"""Joint training: the upper bound of the comparison methods."""

from __future__ import annotations

import hashlib

import numpy as np

from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.methods.classifier_base import ClassifierBaseline


class Joint(ClassifierBaseline):
    """Joint training on the real training data of every task so far (upper bound).

    The method stores each finished task's training images and labels; an epoch of
    task t is one pass over tasks 0..t's data, shuffled together (so later tasks take
    more steps per epoch).
    """

    name = "joint"

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        self.stored: list[tuple[np.ndarray, np.ndarray]] = []
        self.stored_keys: list[str] = []

    def memory(self):
        return list(self.stored)

    def consolidate(self, task: TaskData) -> dict:
        x, y = np.asarray(task.x_train, np.float32), np.asarray(task.y_train, np.int32)
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(x).tobytes())
        h.update(np.ascontiguousarray(y).tobytes())
        self.stored.append((x, y))
        self.stored_keys.append(f"joint_task_{task.index:03d}_{h.hexdigest()[:16]}")
        return {"stored_examples": int(sum(len(y) for _, y in self.stored))}

    def extra_state(self, during_task):
        # Each task's data is a blob named by its content, written once and shared by
        # every later checkpoint.
        shared = {key: {"x": x, "y": y} for key, (x, y) in zip(self.stored_keys, self.stored)}
        return {"stored_keys": list(self.stored_keys)}, {}, shared

    def restore_extra(self, state, arrays, shared):
        self.stored_keys = list(state["stored_keys"])
        self.stored = [(shared[k]["x"], shared[k]["y"]) for k in self.stored_keys]

    def replay_examples(self, n):
        if not self.stored:
            return None
        per_task = max(1, n // len(self.stored))
        return (np.concatenate([x[:per_task] for x, _ in self.stored]),
                np.concatenate([y[:per_task] for _, y in self.stored]))
