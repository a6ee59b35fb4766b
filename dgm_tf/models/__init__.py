"""Networks of DGM: the masked generator and the critic/classifier."""

from dgm_tf.models.discriminator import Discriminator
from dgm_tf.models.generator import Generator, activation_growth_channels, growth_channels

__all__ = ["Discriminator", "Generator", "activation_growth_channels", "growth_channels"]
