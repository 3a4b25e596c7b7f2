"""The files of a run directory."""

import glob
import os

from .config import Config
from .errors import UsageError


class RunDir:
    """Where each file of a run directory lives (no TensorFlow needed: the command line checks
    a run before it imports it).

    A two-level run (VQ-VAE-2) has a prior per level: `at_level("top")` is the same folder with
    each prior file named for that level (prior_top.weights.h5, codes_top.npy, prior_log_top.csv,
    checkpoint/prior_top.npz; "bottom" likewise); the VQ-VAE's files and labels.npy are shared."""

    def __init__(self, root, level=None):
        self.root, self.level = str(root), level

    def at_level(self, level):
        return RunDir(self.root, level)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def prior_path(self, *parts):
        """A prior file's path, named for this view's level (prior.weights.h5 -> prior_top.weights.h5)."""
        *folders, name = parts
        if self.level is not None:
            stem, dot, extension = name.partition(".")
            name = f"{stem}_{self.level}{dot}{extension}"
        return self.path(*folders, name)

    config = property(lambda self: self.path("config.json"))
    vqvae_weights = property(lambda self: self.path("vqvae.weights.h5"))
    vqvae_keras = property(lambda self: self.path("vqvae.keras"))
    prior_weights = property(lambda self: self.prior_path("prior.weights.h5"))
    codes = property(lambda self: self.prior_path("codes.npy"))
    labels = property(lambda self: self.path("labels.npy"))  # class of each code map (--classes)
    samples = property(lambda self: self.path("samples"))
    log = property(lambda self: self.path("log.csv"))
    prior_log = property(lambda self: self.prior_path("prior_log.csv"))
    eval_log = property(lambda self: self.path("eval_log.csv"))
    vqvae_checkpoint = property(lambda self: self.path("checkpoint", "vqvae.npz"))
    prior_checkpoint = property(lambda self: self.prior_path("checkpoint", "prior.npz"))
    xla_cache = property(lambda self: self.path(".xla_cache"))  # sample.py random's compiled samplers

    def holds_vqvae(self) -> bool:
        """Whether a VQ-VAE was trained here: a weights file or a checkpoint was saved. A folder
        with only a config (a run stopped before its first save) holds nothing to resume."""
        return os.path.isfile(self.vqvae_checkpoint) or os.path.isfile(self.vqvae_weights)

    def prior_files(self) -> list:
        """The files `train.py prior` writes that exist now (grids under samples/ included). A
        level's: the top prior's stage writes both levels' code maps, the bottom's the grids."""
        fixed = [self.prior_weights, self.prior_checkpoint, self.prior_log]
        if self.level != "bottom":
            fixed += [self.codes, self.labels] if self.level is None else \
                [self.codes, self.at_level("bottom").codes, self.labels]
        grids = [] if self.level == "top" else \
            sorted(glob.glob(os.path.join(glob.escape(self.samples), "prior_sample_*.png")))
        return [p for p in fixed if os.path.exists(p)] + grids

    def require_config(self) -> Config:
        if not os.path.isdir(self.root):
            raise UsageError(f"no run directory at {self.root}")
        return Config.load(self.config)
