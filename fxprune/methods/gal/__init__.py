"""GAL (Lin et al., CVPR 2019): soft masks, adversarial learning against the original, FISTA;
label-free; removes channels, concat branches and residual blocks."""
from .discriminator import DISCRIMINATORS, make_discriminator, output_features
from .fista import FISTA
from .method import GALMethod, GALOptions, gal

__all__ = ["DISCRIMINATORS", "FISTA", "GALMethod", "GALOptions", "gal", "make_discriminator", "output_features"]
