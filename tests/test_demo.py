"""`python train.py` (the demo), shrunk: it runs end to end, writes its pictures, starts afresh
when run again (a second run must not trip over the first one's files) and prints no retracing
warning; its data set; the whole-batch predictions the grids use."""

import os

import imageio.v3 as iio
import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras import demo
from vq_vae_keras.data import DEMO_BACKGROUNDS, DEMO_SHAPE_COLOURS, make_demo_images


@pytest.mark.slow  # about a minute alone: two shrunk demo runs
def test_the_demo_runs_twice_and_writes_its_pictures(tmp_path, monkeypatch, retracing_warnings):
    monkeypatch.setattr(demo, "DEMO_IMAGES", 48)
    monkeypatch.setattr(demo, "VQVAE_STEPS", 2)
    monkeypatch.setattr(demo, "PRIOR_EPOCHS", 1)
    monkeypatch.setattr(demo, "DEMO_CONFIG", {**demo.DEMO_CONFIG, "z_dim": 8, "batch_size": 16,
                                              "prior_heads": 2, "prior_head_dim": 4, "prior_depth": 1})
    run = str(tmp_path / "demo")
    for _ in range(2):
        demo.run_demo(run)
    samples = os.path.join(run, "samples")
    for name in ("recon.png", "interp.png", "random.png", "test_ae_1_0.png", "test_ae_2_1.png"):
        assert iio.imread(os.path.join(samples, name)).shape == (256, 256, 3), name
    assert len(os.listdir(os.path.join(run, "data"))) == 48
    assert retracing_warnings() == 0  # each model compiles its predict step once


def test_demo_images_are_one_palette_shape_on_a_palette_gradient(tmp_path):
    folder = make_demo_images(str(tmp_path / "a"), count=12, size=64, seed=3)
    again = make_demo_images(str(tmp_path / "b"), count=12, size=64, seed=3)
    shapes, backgrounds = np.array(DEMO_SHAPE_COLOURS), DEMO_BACKGROUNDS
    for name in sorted(os.listdir(folder)):
        img = iio.imread(os.path.join(folder, name)).astype(np.int64)
        assert img.shape == (64, 64, 3)
        np.testing.assert_array_equal(img, iio.imread(os.path.join(again, name)))  # same seed, same files
        # the top and bottom rows' corners are two different background colours (no shape reaches them)
        top, bottom = img[0, 0], img[-1, 0]
        assert np.abs(backgrounds - top).max(axis=1).min() <= 1 and np.abs(backgrounds - bottom).max(axis=1).min() <= 1
        assert np.abs(top - bottom).max() > 10
        # one shape, filled with one palette colour: at least the smallest triangle's area (2 r^2)
        counts = [(img == colour).all(axis=-1).sum() for colour in shapes]
        assert sorted(counts)[-1] >= 2 * (0.2 * 64) ** 2 - 30 and sorted(counts)[-2] == 0, counts


def test_predict_whole_batches_equals_the_model_on_any_count():
    from vq_vae_keras.models import predict_whole_batches

    vqvae = vqk.build_vqvae(vqk.Config(img_dim=16, z_dim=4, num_codes=8))
    x = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)).astype("float32")
    z = predict_whole_batches(vqvae.encoder, x, 4)  # 5 images: one whole batch and one padded
    np.testing.assert_allclose(z, vqvae.encoder(x, training=False), rtol=1e-5, atol=1e-5)
    codes, vectors = predict_whole_batches(vqvae.quantizer, z, 4)
    expected_codes, expected_vectors = vqvae.quantizer(z, training=False)
    assert codes.shape == (5, 4, 4)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_allclose(vectors, expected_vectors, rtol=1e-6)
    empty_codes, empty_vectors = predict_whole_batches(vqvae.quantizer, z[:0], 4)  # no images: empty outputs
    assert empty_codes.shape == (0, 4, 4) and empty_vectors.shape == (0, 4, 4, 4)
