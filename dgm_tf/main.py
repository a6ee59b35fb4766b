r"""Command line: run one continual-learning experiment.

    python -m dgm_tf.main --flagfile=configs/quickstart.cfg --workdir=runs/quickstart

Flags are defined here and nowhere else; they become a frozen ``Config`` that the
library (``dgm_tf.engine.run_experiment``) receives.
"""

from __future__ import annotations

import dataclasses
import errno
import logging as py_logging
import os
import re
import sys
import time
from typing import Sequence

from absl import app, flags, logging

from dgm_tf.config import Config, ConfigError
from dgm_tf.data import DataError  # numpy only; TensorFlow loads with the engine

_D = Config()  # defaults, shown in --help

flags.DEFINE_string("workdir", None, "Directory for everything the run writes (must be new or empty).")
flags.DEFINE_string("method", _D.method, "Method: dgmw or dgma (DGM with weight or activation masks), finetune, joint, "
                    "mas, nispa or dynamos.")
flags.DEFINE_string("dataset", _D.dataset, "Data source: embedded (packaged Fashion-MNIST sample), idx:<dir>, npz:<file>, "
                    "folder:<dir> or tfds:<name>.")
flags.DEFINE_string("data_dir", _D.data_dir, "tfds: directory of prepared datasets (empty: TFDS's default).")
flags.DEFINE_boolean("download", _D.download, "tfds: allow downloading and preparing the dataset (off: fail fast).")
flags.DEFINE_integer("channels", _D.channels, "Image channels: 0 as stored, 1 convert to grayscale, 3 convert to RGB.")
flags.DEFINE_float("test_fraction", _D.test_fraction,
                   "Per-class share held out as test data by sources without a test split (npz x/y, folder).")
flags.DEFINE_list("class_order", [], "Original class ids in task order, comma separated, or random:<seed> "
                  "(empty: sorted ids).")
flags.DEFINE_integer("classes_per_task", _D.classes_per_task, "Classes per task.")
flags.DEFINE_integer("num_tasks", _D.num_tasks, "Number of tasks (0: all the class order allows).")
flags.DEFINE_integer("train_examples_per_class", _D.train_examples_per_class,
                     "Cap on training images per class after the validation split (0: all).")
flags.DEFINE_float("validation_fraction", _D.validation_fraction, "Share of each class's training images held out.")
flags.DEFINE_integer("seed", _D.seed, "Seed of data splits, initialisation, noise and shuffles.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs per task.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Real images per iteration.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Epochs between validation/test evaluations.")
flags.DEFINE_integer("samples_per_class", _D.samples_per_class, "Generated images per class in samples/ grids.")
flags.DEFINE_string("precision", _D.precision,
                  "Keras dtype policy: float32, mixed_bfloat16 (bf16 convolutions, float32 variables; "
                  "fast only on CPUs with AVX512_BF16/AMX or on accelerators), or mixed_float16 (the same in "
                  "float16 with dynamic loss scaling; for GPUs without bf16, slow on CPUs).")
flags.DEFINE_boolean("resume", False, "Continue the run in --workdir from its newest checkpoint (same flags).")
flags.DEFINE_boolean("deterministic", _D.deterministic, "Enable TensorFlow op determinism (bit-exact resume on "
                     "GPUs; CPU runs are deterministic without it, about 10% faster).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Newest checkpoints kept in <workdir>/ckpt.")
flags.DEFINE_integer("log_every_steps", _D.log_every_steps, "Iterations between per-step TensorBoard summaries.")
flags.DEFINE_boolean("export", _D.export, "Export the classifier and generator as SavedModels after every task "
                     "(export/<model>/<task>, TF Serving layout).")
flags.DEFINE_boolean("restore_best", _D.restore_best, "At the end of every task put back the classifier of the "
                     "epoch with the best validation accuracy (what is evaluated, exported and carried on); "
                     "--norestore_best keeps the last epoch's, as the reference does. No effect on nispa, whose "
                     "revert to the previous phase is its own selection.")
flags.DEFINE_string("distribution", _D.distribution,
                  "tf.distribute strategy: none (one device), mirrored (every GPU of this host, synchronous; "
                  "--batch_size stays the global batch), multi_worker (hosts listed in TF_CONFIG).")
flags.DEFINE_integer("nz", _D.nz, "Noise size of the generator (its first entries carry the class code).")
flags.DEFINE_integer("ngf", _D.ngf, "Generator width: the masked layers start at 4·ngf, 2·ngf, ngf channels.")
flags.DEFINE_integer("ndf", _D.ndf, "Discriminator width: ndf, 2·ndf, 4·ndf channels (--critic=dcgan).")
flags.DEFINE_string("critic", _D.critic, "DGM's discriminator: dcgan (the reference's MNIST/SVHN critic, width --ndf) "
                    "or resnet18 (its ImageNet critic: ResNet-18 trunk, 2048 features).")
flags.DEFINE_float("lr", None, "Learning rate of both networks: sets --lr_d and --lr_g unless one of them comes "
                   "after it (on the command line or in a flagfile), in which case that one wins.")
flags.DEFINE_float("lr_d", _D.lr_d, "Discriminator/classifier learning rate (Adam).")
flags.DEFINE_float("lr_g", _D.lr_g, "Generator learning rate (Adam).")
flags.DEFINE_float("beta1", _D.beta1, "Adam beta1 of both networks.")
flags.DEFINE_float("beta2", _D.beta2, "Adam beta2 of both networks.")
flags.DEFINE_float("smax", _D.smax, "Largest mask scale s; masks are binarised at s = smax.")
flags.DEFINE_float("lambda_mask", _D.lambda_mask, "Weight of the mask regulariser (scaled by generator growth).")
flags.DEFINE_float("lambda_gp", _D.lambda_gp, "Weight of the WGAN-GP gradient penalty.")
flags.DEFINE_boolean("aux_g", _D.aux_g, "Add the ACGAN classification loss to the generator.")
flags.DEFINE_boolean("reinit_d", _D.reinit_d, "Re-initialise the discriminator at every task start.")
flags.DEFINE_boolean("replay", _D.replay, "Replay generated past classes to the classifier (--noreplay: ablation).")
flags.DEFINE_float("clip_norm", _D.clip_norm, "Global-norm clip of generator gradients.")
flags.DEFINE_float("hat_thres_cosh", _D.hat_thres_cosh, "Clamp of s·e in the HAT gradient compensation.")

flags.DEFINE_string("classifier", _D.classifier, "finetune/joint/mas: the classifier network, dgm (DGM's "
                    "discriminator trunk with a growing class head) or cnn (a larger CNN).")
flags.DEFINE_float("mas_lambda", _D.mas_lambda, "mas: weight of the importance-weighted penalty.")

flags.DEFINE_string("nispa_network", _D.nispa_network, "nispa: auto (mlp for one-channel images, conv for three), "
                    "mlp (400-400-400) or conv (4 convolutions, fc 1024).")
flags.DEFINE_string("nispa_heads", _D.nispa_heads, "nispa: task (logits times the task's class mask, the paper's "
                    "task-incremental NISPA) or single (one class-incremental head, the reference's NISPA_Replay).")
flags.DEFINE_integer("replay_buffer", _D.replay_buffer, "Stored training images. nispa --nispa_heads=single: split "
                     "evenly over the classes seen (NISPA_Replay: 1000; 0 = no replay); dynamos: the reservoir's "
                     "size (required; the reference's 500, 1000 or 2000).")
flags.DEFINE_float("nispa_density", _D.nispa_density, "nispa: share of each layer's connections that exist "
                   "(0: the reference's, 0.2 MLP / 0.1 ConvNet).")
flags.DEFINE_integer("nispa_hidden", _D.nispa_hidden, "nispa: units of each of the MLP's three hidden layers, or "
                     "of the ConvNet's dense layer (0: the reference's, 400 / 1024).")
flags.DEFINE_integer("nispa_phase_epochs", _D.nispa_phase_epochs, "nispa: epochs per phase (--epochs does not "
                     "apply: the phases decide a task's length).")
flags.DEFINE_float("nispa_lr", _D.nispa_lr, "nispa: Adam's learning rate (0: the reference's, 0.01 MLP / "
                   "0.002 ConvNet).")
flags.DEFINE_float("nispa_k", _D.nispa_k, "nispa: k of the stable-activation schedule p = 0.5 (1 + cos(pi phase / k)); "
                   "a task stops at the latest once p <= 5 %.")
flags.DEFINE_float("nispa_a_f", _D.nispa_a_f, "nispa: stop a task when validation accuracy falls more than this many "
                   "points below its best phase.")
flags.DEFINE_integer("nispa_min_phases", _D.nispa_min_phases, "nispa: phases before an accuracy drop may stop a task.")

flags.DEFINE_integer("dynamos_buffer_batch", _D.dynamos_buffer_batch, "dynamos: buffer samples replayed per step.")
flags.DEFINE_float("dynamos_lr", _D.dynamos_lr, "dynamos: SGD learning rate (no momentum).")
flags.DEFINE_float("dynamos_alpha", _D.dynamos_alpha, "dynamos: weight of MSE(logits, stored logits) on the buffer batch.")
flags.DEFINE_float("dynamos_beta", _D.dynamos_beta, "dynamos: weight of the buffer batch's CE + reward_weight x policy loss.")
flags.DEFINE_float("dynamos_policy_alpha", _D.dynamos_policy_alpha, "dynamos: weight of MSE(policy logits, stored "
                   "policy logits) on the buffer batch.")
flags.DEFINE_float("dynamos_policy_penalty", _D.dynamos_policy_penalty, "dynamos: a misclassified sample's gate "
                   "reward is multiplied by -penalty.")
flags.DEFINE_float("dynamos_reward_weight", _D.dynamos_reward_weight, "dynamos: weight of the policy (REINFORCE) loss.")
flags.DEFINE_float("dynamos_prototype_weight", _D.dynamos_prototype_weight, "dynamos: weight of the prototype loss.")
flags.DEFINE_float("dynamos_keep_ratio", _D.dynamos_keep_ratio, "dynamos: share of gated channels the gates are "
                   "rewarded to keep.")
flags.DEFINE_integer("dynamos_nf", _D.dynamos_nf, "dynamos: channels of the ResNet's first stage (second: 2 nf).")
flags.DEFINE_integer("dynamos_warmup", _D.dynamos_warmup, "dynamos: ungated, CE-only epochs at the run's start "
                     "(steps, when --epochs=1); 0 = none.")

FLAGS = flags.FLAGS


def _last_positions(argv: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """Where each of ``names`` was last given in ``argv`` (flagfiles expanded in place, in
    the order absl reads them): absl keeps only values, not which flag came last."""
    expanded = FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=True)
    positions = {}
    for i, arg in enumerate(expanded):
        if arg == "--":
            break
        match = re.match(r"^--?(\w+)(=|$)", arg)
        if match and match.group(1) in names:
            positions[match.group(1)] = i
    return positions


def config_from_flags(argv: Sequence[str] | None = None) -> Config:
    """The validated Config the flags describe (raises ConfigError).

    ``argv`` (default ``sys.argv``) decides between ``--lr`` and ``--lr_d``/``--lr_g``: the
    one given later wins, so a ``--lr_d`` typed after a flagfile that sets ``--lr`` counts.
    """
    raw_order = [c.strip() for c in FLAGS.class_order]
    if len(raw_order) == 1 and raw_order[0].startswith("random:"):
        order = raw_order[0]  # validated by Config
    else:
        try:
            order = tuple(int(c) for c in raw_order) if raw_order else None
        except ValueError:
            raise ConfigError(
                f"--class_order: expected comma-separated integers or random:<seed>, "
                f"got {','.join(FLAGS.class_order)!r}"
            ) from None
    values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Config)}
    values["class_order"] = order
    if FLAGS.lr is not None:
        where = _last_positions(sys.argv if argv is None else argv, ("lr", "lr_d", "lr_g"))
        for name in ("lr_d", "lr_g"):
            if where.get(name, -1) < where.get("lr", 0):
                values[name] = FLAGS.lr
    return Config(**values)


def write_error_message(e: OSError) -> str:
    """One line for a failed write: the file, the cause, and what to do about that cause."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "resume with --resume once there is room"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = "make the work directory writable, then resume with --resume"
    else:
        remedy = "fix the cause, then resume with --resume"
    return f"cannot write{where}: {e.strerror or e}; files written before stay intact ({remedy})"


class ConsoleFormatter(py_logging.Formatter):
    """One short line per record: ``HH:MM:SS message``, with ``warning:``/``error:`` in
    front of records above INFO (absl's default prefix adds date, thread id and source
    line, which is noise in a progress line; ``--verbosity=1`` keeps it)."""

    def format(self, record: py_logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno <= py_logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp} {level}{record.getMessage()}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def only_own_info(record: py_logging.LogRecord) -> bool:
    """INFO records of this package, and every record above INFO: TensorFlow logs
    through absl too, and writes about eight INFO lines per SavedModel."""
    return record.levelno > py_logging.INFO or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        if not FLAGS.workdir:
            raise ConfigError("--workdir: required (a new or empty directory for the run's files)")
        config = config_from_flags()
        from dgm_tf import runtime

        runtime.prefer_onednn()  # before TensorFlow loads; TF_ENABLE_ONEDNN_OPTS=0 opts out
        verbose = FLAGS.verbosity >= 1  # absl's --verbosity: 1 (debug) shows TensorFlow's own lines
        # multi_worker: the engine's first act is to create the strategy, before any device exists.
        runtime.import_tensorflow(verbose=verbose, discover_devices=config.distribution != "multi_worker")
        if not verbose:
            logging.get_absl_handler().setFormatter(ConsoleFormatter())
            logging.get_absl_handler().addFilter(only_own_info)
        from dgm_tf import engine  # TensorFlow is imported only once the flags are valid

        logging.info("config: %s", config)
        logging.info("runtime: %s", runtime.describe())
        try:
            engine.run_experiment(config, FLAGS.workdir, resume=FLAGS.resume)
        except engine.TrainingError as e:  # training cannot go on: one line, exit 3
            print(f"error: {e}", file=sys.stderr)
            return 3
        except OSError as e:  # e.g. the disk filled up: name the file, keep what was written
            print(f"error: {write_error_message(e)}", file=sys.stderr)
            return 4
    except (ConfigError, DataError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
