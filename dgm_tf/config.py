"""The experiment configuration: one frozen, validated dataclass.

Flags live in ``dgm_tf/main.py`` only; the library receives a ``Config``. Defaults are
the reference's MNIST DGMw setting (SAP/machine-learning-dgm, cfg/cfg_mnist_dgmw.yml),
except ``epochs`` which is shortened so that a default run finishes in minutes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# DGM's two mask kinds, then the comparison methods (DESIGN.md §5; NISPA: issue 20;
# Dynamos: issue 21).
METHODS = ("dgmw", "dgma", "finetune", "joint", "mas", "nispa", "dynamos")
DGM_METHODS = ("dgmw", "dgma")
# --nispa_network: "auto" picks the MLP for one-channel images and the ConvNet for
# three (the reference's MLP for (E)MNIST/Fashion-MNIST, ConvNet for CIFAR).
NISPA_NETWORKS = ("auto", "mlp", "conv")
# --nispa_heads: "task" (the reference's NISPA: logits times the task's class mask),
# "single" (its NISPA_Replay: one class-incremental head, with --replay_buffer).
NISPA_HEADS = ("task", "single")
# Classifier network of the comparison methods: "dgm" is DGM's discriminator trunk with a
# growing class head (so numbers compare with DGM's); "cnn" a larger CNN.
CLASSIFIERS = ("dgm", "cnn")
# Keras dtype policies a run may use. "mixed_bfloat16" computes convolutions in bf16
# with float32 variables; masks, losses, BN statistics and the optimiser stay float32.
# "mixed_float16" does the same in float16 with dynamic loss scaling
# (dgm_tf/loss_scaling.py): the usual choice on GPUs without bf16.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# --distribution: TensorFlow's own strategies (dgm_tf/engine/distribute.py).
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")
# DGM's critic/classifier network: "dcgan" (the reference's MNIST/SVHN netD, three 5x5
# convolutions at --ndf) or "resnet18" (its ImageNet netD: a ResNet-18 trunk, 2048
# features; dgm_tf/models/resnet_critic.py).
CRITICS = ("dcgan", "resnet18")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines an experiment (not where it is written)."""

    # Scenario.
    method: str = "dgmw"
    dataset: str = "embedded"  # embedded, idx:<dir>, npz:<file>, folder:<dir>, tfds:<name>
    data_dir: str = ""  # tfds: where prepared datasets live ("" = TFDS's default)
    download: bool = False  # tfds: allowed to download (never by default)
    channels: int = 0  # 0: as the dataset stores them; 1: to grayscale; 3: to RGB
    test_fraction: float = 0.2  # share held out as test data by sources without a test split
    # None: sorted class ids; a tuple: explicit order; "random:<seed>": a seeded shuffle.
    class_order: tuple[int, ...] | str | None = None
    classes_per_task: int = 1
    num_tasks: int = 0  # 0: as many as the class order allows
    train_examples_per_class: int = 0  # 0: all left after the validation split
    validation_fraction: float = 0.15  # reference: dataloaders/split_MNIST.py pc_valid
    seed: int = 0

    # Training.
    epochs: int = 20  # per task; the reference trains 101 (MNIST) / 151 (SVHN)
    batch_size: int = 64
    eval_every: int = 2  # epochs between validation/test evaluations (reference: 2)
    samples_per_class: int = 10  # generated images per class in samples/ grids
    # tf.config.experimental.enable_op_determinism() for the run: needed for bit-exact
    # resume on GPUs; CPU kernels here are deterministic already (tests/test_resume.py).
    deterministic: bool = False
    keep_checkpoints: int = 3  # newest checkpoints kept in <workdir>/ckpt (one per epoch and task)
    log_every_steps: int = 50  # TensorBoard: iterations between per-step summaries
    export: bool = True  # write export/classifier/<t+1> (and generator/) SavedModels per task
    precision: str = "float32"  # Keras dtype policy of both networks (see PRECISIONS)
    # Put the best-validation epoch's classifier back at the end of every task, before
    # evaluation, export, checkpoint and end_task (False: the reference's last epoch).
    restore_best: bool = True
    # tf.distribute strategy (DISTRIBUTIONS): "none" (one device), "mirrored" (every
    # device of this host, synchronous), "multi_worker" (hosts from TF_CONFIG).
    distribution: str = "none"
    critic: str = "dcgan"  # see CRITICS (DGM methods only)

    # Networks (reference MNIST DGMw).
    nz: int = 128
    ngf: int = 6
    ndf: int = 32

    # Optimisation (reference MNIST DGMw: lr_D = lr_G = 0.002, beta1 = 0.5).
    lr_d: float = 0.002
    lr_g: float = 0.002
    beta1: float = 0.5
    beta2: float = 0.999

    # DGM.
    smax: float = 1e4
    lambda_mask: float = 0.08
    lambda_gp: float = 1.0
    aux_g: bool = False  # add the ACGAN class loss to the generator (reference: aux_G)
    reinit_d: bool = True  # fresh discriminator at every task start (reference: reinit_D)
    replay: bool = True  # replay generated past classes to the classifier (False: ablation)
    clip_norm: float = 10000.0  # generator gradient-norm clip (reference: clipgrad)
    hat_thres_cosh: float = 50.0  # clamp of s*e in the HAT compensation (reference)

    # Comparison methods (finetune, joint, mas).
    classifier: str = "dgm"  # see CLASSIFIERS; DGM's classifier is always its discriminator
    mas_lambda: float = 1.0  # MAS penalty weight (Aljundi et al., ECCV 2018)

    # NISPA (Gurbuz & Dovrolis, ICML 2022; dgm_tf/methods/nispa.py). Defaults: the
    # reference's task-incremental scripts (NISPA/EFMNIST_experiment.sh, CIFAR10_experiment.sh).
    nispa_network: str = "auto"  # see NISPA_NETWORKS
    nispa_heads: str = "task"  # see NISPA_HEADS
    replay_buffer: int = 0  # stored training images: nispa single head (NISPA_Replay: 1000), dynamos (500)
    nispa_density: float = 0.0  # share of each layer's connections; 0 = the reference's (0.2 MLP, 0.1 ConvNet)
    nispa_hidden: int = 0  # MLP hidden units per layer / ConvNet dense units; 0 = the reference's (400 / 1024)
    nispa_phase_epochs: int = 5  # epochs per phase (the reference's --phase_epochs)
    nispa_lr: float = 0.0  # Adam's rate; 0 = the reference's (0.01 MLP, 0.002 ConvNet)
    nispa_k: float = 30.0  # p schedule p = 0.5 (1 + cos(pi phase / k)) (--step_size_param)
    nispa_a_f: float = 0.75  # stop when validation accuracy falls this many points below the best
    nispa_min_phases: int = 2  # accuracy stops only after this many phases (reference: t > 2)

    # Dynamos (Varma et al., arXiv 2301.00620; dgm_tf/methods/dynamos.py). Defaults: the
    # reference's best seq-MNIST setting at buffer 500 (utils/best_args.py); the buffer's
    # size is --replay_buffer, the batch --batch_size, the epochs per task --epochs.
    dynamos_buffer_batch: int = 10  # buffer samples replayed per step (its --minibatch_size)
    dynamos_lr: float = 0.07  # SGD without momentum
    dynamos_alpha: float = 0.2  # weight of MSE(logits, stored logits) on the buffer batch
    dynamos_beta: float = 2.0  # weight of the buffer batch's CE + reward_weight * policy loss
    dynamos_policy_alpha: float = 0.2  # weight of MSE(policy logits, stored policy logits)
    dynamos_policy_penalty: float = -500.0  # reward factor -penalty on a misclassified sample
    dynamos_reward_weight: float = 0.5  # weight of the policy (REINFORCE) loss
    dynamos_prototype_weight: float = 0.3  # weight of the prototype loss
    dynamos_keep_ratio: float = 0.7  # share of channels the gates are rewarded to keep
    dynamos_nf: int = 32  # width of the ResNet's first stage (the second has 2 nf)
    dynamos_warmup: int = 10  # ungated CE-only epochs (steps, when --epochs=1) at the run's start

    def __post_init__(self):
        validate(self)

    def to_flags(self) -> list[str]:
        """``--name=value`` lines that reproduce this config with ``dgm_tf.main``."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "class_order":
                if value is None:
                    value = ""
                elif not isinstance(value, str):
                    value = ",".join(str(c) for c in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            lines.append(f"--{field.name}={value}")
        return lines

    @classmethod
    def from_flags_text(cls, text: str) -> "Config":
        """Inverse of ``to_flags`` (the lines of a run's flags.txt; comments ignored)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, raw = line.partition("=")
            name = name.lstrip("-")
            if not sep or name not in defaults:
                raise ConfigError(f"unexpected line {line!r}")
            default = defaults[name]
            if name == "class_order":
                if not raw:
                    value = None
                elif raw.startswith("random:"):
                    value = raw
                else:
                    value = tuple(int(c) for c in raw.split(","))
            elif isinstance(default, bool):
                if raw not in ("true", "false"):
                    raise ConfigError(f"--{name}: expected true or false, got {raw!r}")
                value = raw == "true"
            else:
                try:
                    value = type(default)(raw)
                except ValueError:
                    raise ConfigError(f"--{name}: cannot read {raw!r} as {type(default).__name__}") from None
            values[name] = value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["class_order"], tuple):
            d["class_order"] = list(d["class_order"])
        return d


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{flag}: {message}")


def validate(c: Config) -> None:
    """Raise ConfigError naming the first flag whose value is invalid."""
    _require(c.method in METHODS, "method", f"unknown method {c.method!r}; choose one of {', '.join(METHODS)}")
    _require(
        c.classifier in CLASSIFIERS,
        "classifier",
        f"unknown classifier {c.classifier!r}; choose one of {', '.join(CLASSIFIERS)}",
    )
    _require(
        c.method not in DGM_METHODS or c.classifier == "dgm",
        "classifier",
        f"{c.method} classifies with its discriminator; --classifier={c.classifier} applies to "
        "finetune, joint and mas only",
    )
    _require(
        c.method not in ("nispa", "dynamos") or c.classifier == "dgm",
        "classifier",
        f"{c.method} trains its own network; --classifier={c.classifier} applies to "
        "finetune, joint and mas only",
    )
    for f in dataclasses.fields(c):  # inf/nan would only surface as a NaN loss later
        value = getattr(c, f.name)
        if isinstance(value, float):
            _require(math.isfinite(value), f.name, f"must be a finite number, got {value}")
    _require(
        c.distribution in DISTRIBUTIONS,
        "distribution",
        f"unknown distribution {c.distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}",
    )
    _require(c.mas_lambda >= 0, "mas_lambda", f"must be >= 0, got {c.mas_lambda}")
    _validate_nispa(c)
    _validate_dynamos(c)
    _require(c.critic in CRITICS, "critic", f"unknown critic {c.critic!r}; choose one of {', '.join(CRITICS)}")
    _require(
        c.critic == "dcgan" or c.method in DGM_METHODS,
        "critic",
        f"the critic is DGM's discriminator; --critic={c.critic} does not apply to --method={c.method}",
    )
    _require(bool(c.dataset), "dataset", "must not be empty (e.g. embedded, idx:/path/to/dir)")
    _require(c.channels in (0, 1, 3), "channels", f"must be 0 (as stored), 1 or 3, got {c.channels}")
    _require(0.0 < c.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {c.test_fraction}")
    if isinstance(c.class_order, str):
        _require(
            re.fullmatch(r"random:\d+", c.class_order) is not None,
            "class_order",
            f"expected comma-separated class ids or random:<seed>, got {c.class_order!r}",
        )
    elif c.class_order is not None:
        _require(len(c.class_order) > 0, "class_order", "must list at least one class")
        _require(all(int(x) >= 0 for x in c.class_order), "class_order", "class ids must be >= 0")
        dupes = sorted({x for x in c.class_order if c.class_order.count(x) > 1})
        _require(not dupes, "class_order", f"repeats classes {dupes}")
    _require(c.classes_per_task >= 1, "classes_per_task", f"must be >= 1, got {c.classes_per_task}")
    _require(c.num_tasks >= 0, "num_tasks", f"must be >= 0 (0 = all), got {c.num_tasks}")
    _require(
        c.train_examples_per_class >= 0,
        "train_examples_per_class",
        f"must be >= 0 (0 = all), got {c.train_examples_per_class}",
    )
    _require(
        0.0 < c.validation_fraction < 1.0,
        "validation_fraction",
        f"must be in (0, 1), got {c.validation_fraction}",
    )
    _require(c.epochs >= 1, "epochs", f"must be >= 1, got {c.epochs}")
    _require(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}")
    _require(c.eval_every >= 1, "eval_every", f"must be >= 1, got {c.eval_every}")
    _require(
        c.precision in PRECISIONS,
        "precision",
        f"unknown precision {c.precision!r}; choose one of {', '.join(PRECISIONS)}",
    )
    _require(
        c.method != "mas" or c.precision != "mixed_float16",
        "precision",
        "mas does not run in mixed_float16 (its importance gradients are not loss-scaled and would "
        "underflow in float16); use float32 or mixed_bfloat16",
    )
    _require(c.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {c.keep_checkpoints}")
    _require(c.log_every_steps >= 1, "log_every_steps", f"must be >= 1, got {c.log_every_steps}")
    _require(c.samples_per_class >= 1, "samples_per_class", f"must be >= 1, got {c.samples_per_class}")
    _require(c.nz >= 1, "nz", f"must be >= 1, got {c.nz}")
    _require(c.ngf >= 1, "ngf", f"must be >= 1, got {c.ngf}")
    _require(c.ndf >= 1, "ndf", f"must be >= 1, got {c.ndf}")
    for name in ("lr_d", "lr_g", "smax", "clip_norm", "hat_thres_cosh"):
        _require(getattr(c, name) > 0, name, f"must be > 0, got {getattr(c, name)}")
    for name in ("beta1", "beta2"):
        _require(0.0 <= getattr(c, name) < 1.0, name, f"must be in [0, 1), got {getattr(c, name)}")
    for name in ("lambda_mask", "lambda_gp"):
        _require(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    _require(c.smax >= 1, "smax", f"must be >= 1 (masks are binarised at s = smax), got {c.smax}")


def _validate_nispa(c: Config) -> None:
    """The NISPA flags (checked whatever the method, so a flagfile's typo surfaces)."""
    _require(
        c.nispa_network in NISPA_NETWORKS,
        "nispa_network",
        f"unknown network {c.nispa_network!r}; choose one of {', '.join(NISPA_NETWORKS)}",
    )
    _require(
        c.nispa_heads in NISPA_HEADS,
        "nispa_heads",
        f"unknown heads {c.nispa_heads!r}; choose one of {', '.join(NISPA_HEADS)}",
    )
    _require(c.replay_buffer >= 0, "replay_buffer", f"must be >= 0 (0 = none), got {c.replay_buffer}")
    _require(
        c.replay_buffer == 0 or (c.method == "nispa" and c.nispa_heads == "single") or c.method == "dynamos",
        "replay_buffer",
        f"applies to --method=dynamos and to --method=nispa --nispa_heads=single (the reference's "
        f"NISPA_Replay), not to --method={c.method} --nispa_heads={c.nispa_heads}",
    )
    _require(
        c.nispa_density == 0.0 or 0.0 < c.nispa_density <= 1.0,
        "nispa_density",
        f"must be in (0, 1], or 0 for the reference's density, got {c.nispa_density}",
    )
    _require(
        c.nispa_hidden >= 0, "nispa_hidden", f"must be >= 1, or 0 for the reference's widths, got {c.nispa_hidden}"
    )
    _require(c.nispa_phase_epochs >= 1, "nispa_phase_epochs", f"must be >= 1, got {c.nispa_phase_epochs}")
    _require(c.nispa_lr >= 0, "nispa_lr", f"must be > 0, or 0 for the reference's rate, got {c.nispa_lr}")
    # The first two phases always run (p(2) > 5 % needs k > 2.34; accuracy stops from
    # phase 3 on), so the phase a stop reverts to has selected stable units of its task.
    _require(c.nispa_k >= 3, "nispa_k", f"must be >= 3 (so that phases 1 and 2 always run), got {c.nispa_k}")
    _require(c.nispa_a_f >= 0, "nispa_a_f", f"must be >= 0 (accuracy points), got {c.nispa_a_f}")
    _require(c.nispa_min_phases >= 2, "nispa_min_phases", f"must be >= 2, got {c.nispa_min_phases}")
    _require(
        c.method != "nispa" or c.precision == "float32",
        "precision",
        f"nispa runs in float32 only (its masked layers keep no separate compute dtype), got {c.precision}",
    )


def _validate_dynamos(c: Config) -> None:
    """The Dynamos flags (checked whatever the method, so a flagfile's typo surfaces)."""
    _require(
        c.method != "dynamos" or c.replay_buffer >= 1,
        "replay_buffer",
        f"dynamos rehearses from a buffer of stored images: give its size (the reference: 500, "
        f"1000 or 2000), got {c.replay_buffer}",
    )
    _require(c.dynamos_buffer_batch >= 1, "dynamos_buffer_batch", f"must be >= 1, got {c.dynamos_buffer_batch}")
    _require(
        c.method != "dynamos" or c.dynamos_buffer_batch <= c.replay_buffer,
        "dynamos_buffer_batch",
        f"{c.dynamos_buffer_batch} samples per step cannot come from a buffer of {c.replay_buffer}",
    )
    _require(c.dynamos_lr > 0, "dynamos_lr", f"must be > 0, got {c.dynamos_lr}")
    for name in ("dynamos_alpha", "dynamos_beta", "dynamos_policy_alpha", "dynamos_reward_weight",
                 "dynamos_prototype_weight"):
        _require(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    _require(0.0 < c.dynamos_keep_ratio <= 1.0, "dynamos_keep_ratio", f"must be in (0, 1], got {c.dynamos_keep_ratio}")
    _require(c.dynamos_nf >= 2, "dynamos_nf", f"must be >= 2, got {c.dynamos_nf}")
    _require(c.dynamos_warmup >= 0, "dynamos_warmup", f"must be >= 0 (0 = none), got {c.dynamos_warmup}")
    _require(
        c.method != "dynamos" or c.precision == "float32",
        "precision",
        f"dynamos runs in float32 only (its gates' log-probabilities), got {c.precision}",
    )
