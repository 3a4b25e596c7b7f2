"""`python train.py` (the demo), shrunk: it runs end to end, writes its pictures, and starts
afresh when run again (a second run must not trip over the first one's files)."""

import os

import imageio.v3 as iio

from vq_vae_keras import demo


def test_the_demo_runs_twice_and_writes_its_pictures(tmp_path, monkeypatch):
    real = demo.make_demo_images
    monkeypatch.setattr(demo, "make_demo_images", lambda folder, count, size: real(folder, count=48, size=size))
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
