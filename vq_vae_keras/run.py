"""A run directory: where each file lives, and loading a trained run back."""

import glob
import os
from dataclasses import dataclass
from typing import Optional

import keras

from .config import Config
from .errors import UsageError
from .io import load_weights
from .models import VQVAE, build_vqvae


class RunDir:
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

    def prior_files(self) -> list:
        """The files `train.py prior` writes that exist now (grids under samples/ included)."""
        fixed = [self.prior_weights, self.prior_checkpoint, self.codes, self.labels, self.prior_log]
        grids = sorted(glob.glob(os.path.join(glob.escape(self.samples), "prior_sample_*.png")))
        return [p for p in fixed if os.path.exists(p)] + grids

    def require_config(self) -> Config:
        if not os.path.isdir(self.root):
            raise UsageError(f"no run directory at {self.root}")
        return Config.load(self.config)


@dataclass
class LoadedRun:
    config: Config
    vqvae: VQVAE
    prior: Optional[keras.Model]


def load_vqvae(config: Config, run: RunDir) -> VQVAE:
    """The run's VQ-VAE, built from config, weights loaded."""
    vqvae = build_vqvae(config)
    load_weights(vqvae.train_model, run.vqvae_weights, "VQ-VAE weights")
    return vqvae


def load_run(run, prior=True) -> LoadedRun:
    """Config, VQ-VAE and (if trained) prior of a run directory, weights loaded.
    prior=False skips the prior (`.prior` is None): what needs only the VQ-VAE then works even
    when the prior's file is missing or broken."""
    from .priors import build_prior

    run = RunDir(run)
    config = run.require_config()
    vqvae = load_vqvae(config, run)
    want_prior, prior = prior, None
    if want_prior and os.path.isfile(run.prior_weights):
        prior = build_prior(config)
        load_weights(prior, run.prior_weights, "prior weights")
    return LoadedRun(config, vqvae, prior)
