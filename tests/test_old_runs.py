"""A run directory written by an earlier release (main at 5b9b292, before the package was
installable: tests/fixtures/run_from_5b9b292, a 16 px VQ-VAE and a one-block prior trained 3 steps
each) still loads, gives the same numbers, and resumes."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.priors.tokens import codes_to_tokens

from conftest import ROOT, run_cli, write_images
from test_sampling import assert_replayed

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "run_from_5b9b292")


@pytest.fixture
def old_run(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    os.remove(os.path.join(run, "expected.npz"))
    # The images it was trained on: the same generator, seed and size as then.
    return run, write_images(tmp_path / "images", count=8, size=16, seed=0)


def test_an_earlier_release_run_loads_and_gives_the_same_numbers(old_run):
    run, images_dir = old_run
    expected = np.load(os.path.join(FIXTURE, "expected.npz"))
    loaded = vqk.load_run(run)
    images = vqk.load_images(images_dir, 16)
    codes, _ = loaded.vqvae.quantize(loaded.vqvae.encode(images))
    np.testing.assert_array_equal(codes, expected["codes"])
    np.testing.assert_allclose(loaded.vqvae.reconstruct(images), expected["recon"], atol=1e-5)
    # That release drew its samples' Gumbel noise from tf.random's stateless stream, key (seed,
    # position), one row per sample of its one batch of 4, under XLA: with that noise the loaded
    # prior's probabilities give the codes it drew then (seed 0). This release's noise differs
    # (sampling.noise), so a seed now draws other codes.
    old = expected["samples"].reshape(4, -1)
    probs = loaded.prior.predict(codes_to_tokens(expected["samples"])[:, :-1], verbose=0).astype(np.float64)
    stream = tf.function(lambda key: tf.random.stateless_uniform(
        (4, probs.shape[-1]), key, minval=np.finfo(np.float32).tiny, maxval=1.0), jit_compile=True)
    checked = 0
    for i in range(old.shape[1]):
        scores = np.log(probs[:, i]) - np.log(-np.log(stream(tf.constant([0, i], tf.int64)).numpy()))
        ranked = np.sort(scores, axis=-1)
        clear = ranked[:, -1] - ranked[:, -2] > 1e-4  # not a near-tie that float rounding may flip
        np.testing.assert_array_equal(scores.argmax(-1)[clear], old[clear, i])
        checked += clear.sum()
    assert checked >= 0.9 * old.size
    assert_replayed(loaded.prior, vqk.sample_codes(loaded.prior, 4, loaded.config.grid_shape, seed=0), 0,
                    top_k=loaded.config.num_codes)


@pytest.mark.slow
def test_an_earlier_release_run_resumes_both_stages(old_run):
    run, images_dir = old_run
    # Trained with XLA, then the default: a resume may turn it off (speed alone), and records that.
    run_cli("train.py", "vqvae", "--run", run, "--resume", "--data", images_dir, "--steps", "5", "--no-jit")
    run_cli("train.py", "prior", "--run", run, "--resume", "--steps", "5", "--jit")
    saved = vqk.Config.load(os.path.join(run, "config.json"))
    assert (saved.jit_compile, saved.prior_jit_compile) == (False, True)
    with open(os.path.join(run, "log.csv")) as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3", "4", "5"]
    assert vqk.load_run(run).prior is not None
