"""Every file a run writes gets the mode the user's umask gives (0644 under umask 022, 0600 under
077), as files made by open() do; the atomic writer's temporary file once kept a private 0600."""

import os
import stat

import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras import io
from vq_vae_keras.training import train_prior, train_vqvae

from conftest import tiny_config, write_images


@pytest.fixture
def umask(request):
    previous = os.umask(request.param)  # process-wide: restored before anything else runs
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True)
def test_a_runs_files_follow_the_umask(tmp_path, umask):
    data = write_images(tmp_path / "images", count=8)
    run = str(tmp_path / "run")
    config = tiny_config(sample_every=2, sample_every_epochs=1)
    train_vqvae(config, run, steps=2, data=data, cache=str(tmp_path / "cache.npz"), eval_data=data, eval_every=1)
    train_prior(config, run, steps=2)
    io.atomic_write_text(os.path.join(run, "eval.json"), "{}\n")
    io.save_npy(os.path.join(run, "sampled_codes.npy"), np.zeros((1, 4, 4), np.int32))

    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names
             if not root.startswith(str(tmp_path / "images"))]
    names = {os.path.relpath(path, run) for path in files}
    assert {"config.json", "vqvae.weights.h5", "vqvae.keras", "prior.weights.h5", "codes.npy", "log.csv",
            "prior_log.csv", "eval_log.csv", "eval.json", os.path.join("checkpoint", "vqvae.npz"),
            os.path.join("checkpoint", "prior.npz"), os.path.join("samples", "test_ae_2_0.png"),
            os.path.join("..", "cache.npz")} <= names, names
    modes = {os.path.relpath(path, run): oct(stat.S_IMODE(os.stat(path).st_mode)) for path in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert vqk.load_run(run).prior is not None  # and the files still read back
