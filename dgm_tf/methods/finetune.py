"""Fine-tuning: the lower bound of the comparison methods."""

from __future__ import annotations

from dgm_tf.methods.classifier_base import ClassifierBaseline


class FineTune(ClassifierBaseline):
    """Fine-tuning: each task's data only, no memory, no regulariser (lower bound)."""

    name = "finetune"
