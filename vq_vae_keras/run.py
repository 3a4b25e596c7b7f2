"""A run directory: where each file lives, and loading a trained run back."""

import os
from dataclasses import dataclass
from typing import Optional

import keras

from .config import Config
from .io import load_weights
from .models import VQVAE, build_vqvae
from .rundir import RunDir


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
