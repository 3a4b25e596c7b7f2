"""A run directory written by an earlier release (main at 5b9b292, before the package was
installable: tests/fixtures/run_from_5b9b292, a 16 px VQ-VAE and a one-block prior trained 3 steps
each) still loads, gives the same numbers, and resumes."""

import os
import shutil

import numpy as np
import pytest

import vq_vae_keras as vqk

from conftest import ROOT, run_cli, write_images

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
    samples = vqk.sample_codes(loaded.prior, 4, loaded.config.grid_shape, seed=0)
    np.testing.assert_array_equal(samples, expected["samples"])


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
