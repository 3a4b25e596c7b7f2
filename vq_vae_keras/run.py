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
    prior: Optional[keras.Model]  # a two-level run's: the bottom prior
    top_prior: Optional[keras.Model] = None  # a two-level run's top prior


def load_vqvae(config: Config, run: RunDir) -> VQVAE:
    """The run's VQ-VAE, built from config, weights loaded."""
    vqvae = build_vqvae(config)
    load_weights(vqvae.train_model, run.vqvae_weights, "VQ-VAE weights")
    return vqvae


def load_prior(config: Config, run: RunDir, level=None):
    """The run's prior (level: a two-level run's "top" or "bottom"), built from config, weights
    loaded; None where it was not trained."""
    from .priors import build_prior

    path = run.at_level(level).prior_weights
    if not os.path.isfile(path):
        return None
    prior = build_prior(config, level)
    load_weights(prior, path, f"{level + ' ' if level else ''}prior weights")
    return prior


def load_run(run, prior=True) -> LoadedRun:
    """Config, VQ-VAE and (if trained) prior of a run directory, weights loaded; a two-level
    run's bottom prior as `.prior`, its top prior as `.top_prior`.
    prior=False skips the priors (None): what needs only the VQ-VAE then works even when a
    prior's file is missing or broken."""
    run = RunDir(run)
    config = run.require_config()
    vqvae = load_vqvae(config, run)
    if not prior:
        return LoadedRun(config, vqvae, None)
    if config.levels == 2:
        return LoadedRun(config, vqvae, load_prior(config, run, "bottom"), load_prior(config, run, "top"))
    return LoadedRun(config, vqvae, load_prior(config, run))
