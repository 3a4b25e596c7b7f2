"""`python train.py` with no arguments: a small end-to-end run on built-in data.

Writes 2000 PNGs of one coloured shape on a gradient each (no download), trains a 32 px VQ-VAE and
its prior, and writes reconstruction, interpolation and random-sample grids. About 4.5 minutes on 2 cores.
"""

import os
import shutil

import numpy as np

from .config import Config
from .data import ImageFolder, make_demo_images
from .grids import codes_grid, interpolation_grid, reconstruction_grid
from .io import save_png
from .priors.sampling import sample_codes
from .training import train_prior, train_vqvae

# Why these settings: on the earlier data (one or two shapes of any colour on gradients between any
# two colours) the codes spent themselves on colour, and the prior, trained on 2000 such maps, drew
# colour blobs after 10 epochs as after 30. With a few palette colours and one shape per image the
# VQ-VAE uses about half its codes and gets by with z_dim 32 (a training step 2.5-3x cheaper than
# z_dim 64's), and the prior draws shapes after about 20 epochs. A prior half the reference's width
# (4 heads of 32) is enough for 8x8 code maps (its held-out NLL is lowest near epoch 20, then
# creeps up) and 1.7x faster a step: with 25 epochs the demo stays under 5 minutes on 2 cores.
# 10% of the code maps are held out for the prior log's val_nll column.
DEMO_CONFIG = dict(img_dim=32, z_dim=32, num_codes=64, batch_size=64, sample_every=500, sample_every_epochs=5,
                   val_split=0.1, prior_heads=4)
DEMO_IMAGES = 2000
VQVAE_STEPS = 1500
PRIOR_EPOCHS = 25


def run_demo(run_dir):
    data = os.path.join(run_dir, "data")
    for stale in ("data", "config.json", "checkpoint", "samples", "log.csv", "prior_log.csv", "codes.npy"):
        path = os.path.join(run_dir, stale)  # the demo starts afresh each time, its data too
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    make_demo_images(data, count=DEMO_IMAGES, size=64)
    config = Config(data=data, **DEMO_CONFIG)
    print(f"demo: {VQVAE_STEPS} VQ-VAE steps on {data}, then {PRIOR_EPOCHS} prior epochs")
    vqvae = train_vqvae(config, run_dir, steps=VQVAE_STEPS, cache="auto", deterministic=True, overwrite=True)
    prior = train_prior(config, run_dir, epochs=PRIOR_EPOCHS, deterministic=True, overwrite=True)

    samples = os.path.join(run_dir, "samples")
    rng = np.random.default_rng(0)
    folder = ImageFolder(data, config.img_dim)
    outputs = {
        "recon.png": reconstruction_grid(vqvae, folder.random_images(32, rng), 8),
        "interp.png": interpolation_grid(vqvae, folder.random_images(8, rng), folder.random_images(8, rng), 8),
        "random.png": codes_grid(vqvae, sample_codes(prior, 64, config.grid_shape, seed=0)),
    }
    for name, grid in outputs.items():
        save_png(os.path.join(samples, name), grid)
    print(f"\ndemo done. Pictures in {samples}/:")
    print("  test_ae_1_*.png / test_ae_2_*.png  reconstructions during training (without / with quantization)")
    print("  recon.png   real | reconstruction columns      interp.png  interpolations")
    print("  random.png  samples from the prior             prior_sample_*.png  samples every 5 prior epochs")
