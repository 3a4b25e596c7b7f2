"""The files of a run directory."""

import glob
import os

from .config import Config
from .errors import UsageError


class RunDir:
    """Where each file of a run directory lives (no TensorFlow needed: the command line checks
    a run before it imports it)."""

    def __init__(self, root):
        self.root = str(root)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    config = property(lambda self: self.path("config.json"))
    vqvae_weights = property(lambda self: self.path("vqvae.weights.h5"))
    vqvae_keras = property(lambda self: self.path("vqvae.keras"))
    prior_weights = property(lambda self: self.path("prior.weights.h5"))
    codes = property(lambda self: self.path("codes.npy"))
    labels = property(lambda self: self.path("labels.npy"))  # class of each code map (--classes)
    samples = property(lambda self: self.path("samples"))
    log = property(lambda self: self.path("log.csv"))
    prior_log = property(lambda self: self.path("prior_log.csv"))
    eval_log = property(lambda self: self.path("eval_log.csv"))
    vqvae_checkpoint = property(lambda self: self.path("checkpoint", "vqvae.npz"))
    prior_checkpoint = property(lambda self: self.path("checkpoint", "prior.npz"))
    xla_cache = property(lambda self: self.path(".xla_cache"))  # sample.py random's compiled samplers

    def holds_vqvae(self) -> bool:
        """Whether a VQ-VAE was trained here: a weights file or a checkpoint was saved. A folder
        with only a config (a run stopped before its first save) holds nothing to resume."""
        return os.path.isfile(self.vqvae_checkpoint) or os.path.isfile(self.vqvae_weights)

    def prior_files(self) -> list:
        """The files `train.py prior` writes that exist now (grids under samples/ included)."""
        fixed = [self.prior_weights, self.prior_checkpoint, self.codes, self.labels, self.prior_log]
        grids = sorted(glob.glob(os.path.join(glob.escape(self.samples), "prior_sample_*.png")))
        return [p for p in fixed if os.path.exists(p)] + grids

    def require_config(self) -> Config:
        if not os.path.isdir(self.root):
            raise UsageError(f"no run directory at {self.root}")
        return Config.load(self.config)
