"""Continual-learning methods; each registered under its --method name."""

from __future__ import annotations

from dgm_tf.config import Config, ConfigError
from dgm_tf.methods.base import ContinualMethod
from dgm_tf.methods.dgm import DGMa, DGMw
from dgm_tf.methods.dynamos import Dynamos
from dgm_tf.methods.finetune import FineTune
from dgm_tf.methods.joint import Joint
from dgm_tf.methods.mas import MAS
from dgm_tf.methods.nispa import NISPA

METHODS: dict[str, type[ContinualMethod]] = {
    "dgmw": DGMw,
    "dgma": DGMa,
    "finetune": FineTune,
    "joint": Joint,
    "mas": MAS,
    "nispa": NISPA,
    "dynamos": Dynamos,
}


def make_method(config: Config, scenario) -> ContinualMethod:
    """The method named by ``config.method`` for ``scenario``."""
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ConfigError(f"--method: unknown method {config.method!r}; choose one of {', '.join(METHODS)}") from None
    return cls(config, scenario)


__all__ = ["METHODS", "ContinualMethod", "DGMa", "DGMw", "Dynamos", "NISPA", "make_method"]
