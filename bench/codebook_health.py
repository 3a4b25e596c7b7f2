"""Codebook options side by side: code usage and held-out reconstruction error at equal steps.

    python bench/codebook_health.py [--data DIR] [--held-out DIR] [--steps 600] [--img-dim 32]

Trains the default (the reference's VQ) and each codebook option for the same number of steps on
the same folder with the same seed, then reports on held-out images: the fraction of codes used,
the code perplexity, and the reconstruction MSE through the quantizer, each also as a ratio to
the default. Without --data it uses the demo's shapes (2000 to train, 500 others held out).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import numpy as np  # noqa: E402
from vq_vae_keras.codebook import counts_perplexity, usage_counts  # noqa: E402
from vq_vae_keras.data import make_demo_images  # noqa: E402
from vq_vae_keras.training import train_vqvae  # noqa: E402

OPTIONS = {
    "default (vq)": {},
    "ema": {"quantizer": "ema"},
    "ema + kmeans-init + restart-dead 50": {"quantizer": "ema", "kmeans_init": True, "restart_dead": 50},
    "vq + kmeans-init + restart-dead 50": {"kmeans_init": True, "restart_dead": 50},
    "gumbel": {"quantizer": "gumbel"},
    "gumbel, annealed over half the steps": {"quantizer": "gumbel", "gumbel_anneal_steps": None},
}


def held_out_scores(vqvae, images, num_codes):
    codes, vectors = vqvae.quantize(vqvae.encode(images))
    mse = float(np.mean((vqvae.decode(vectors) - images) ** 2))
    counts = usage_counts(codes, num_codes)
    return (counts > 0).mean(), counts_perplexity(counts), mse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="training folder (default: the demo's shapes)")
    parser.add_argument("--held-out", help="held-out folder (default: other demo shapes)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--img-dim", type=int, default=32)
    parser.add_argument("--z-dim", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_demo_images(os.path.join(tmp, "train"), count=2000, size=64, seed=0)
        held_out = vqk.load_images(args.held_out or make_demo_images(os.path.join(tmp, "held_out"), count=500,
                                                                     size=64, seed=1), args.img_dim)
        results = {}
        for name, options in OPTIONS.items():
            if options.get("gumbel_anneal_steps", 0) is None:
                options = {**options, "gumbel_anneal_steps": max(1, args.steps // 2)}
            config = vqk.Config(data=data, img_dim=args.img_dim, z_dim=args.z_dim, sample_every=10**9, **options)
            vqvae = train_vqvae(config, os.path.join(tmp, name.replace(" ", "_")), steps=args.steps)
            results[name] = held_out_scores(vqvae, held_out, config.num_codes)

    used0, perplexity0, mse0 = results["default (vq)"]
    print(f"\n{args.steps} steps at {args.img_dim} px, {len(held_out)} held-out images:")
    print(f"  {'':38s} {'codes used':>10s} {'perplexity':>10s} {'held-out mse':>12s}   ratios to default")
    for name, (used, perplexity, mse) in results.items():
        print(f"  {name:38s} {used:10.2f} {perplexity:10.1f} {mse:12.5f}   "
              f"used x{used / used0:.2f}, mse x{mse / mse0:.2f}")


if __name__ == "__main__":
    main()
