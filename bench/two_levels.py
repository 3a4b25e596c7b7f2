"""VQ-VAE-2's two levels against the reference's one, the same steps on the same photographs.

    python bench/two_levels.py --data DIR --held-out DIR [--img-dim 64] [--steps 1500] [--seeds 3]
                               [--prior-steps N --grids DIR] [--csv FILE]

For each seed, trains the one-level model (the reference) and the two-level one (`levels=2`, the
same codebook size at both levels) for --steps steps, and scores the held-out images as `sample.py
evaluate` does (PSNR and SSIM through the quantizer, codes used). Each run's bits per image are
those of its code maps at a fixed rate, h * w * log2(num_codes) summed over its levels: the
two-level model spends a quarter more at the same codebook size. Seconds per step are timed in the
same process, so their ratio is the cost of the second level on this machine.

--grids DIR (first seed): a grid of held-out reconstructions of each run; with --prior-steps N also
trains each run's priors for N steps (the two-level run's top then bottom), writes a grid of 64
samples of each, and adds the priors' bits per image (the held-out codes' NLL,
`prior_bits_per_image`). Photographs: bench/photos.py --size 64.
"""

import argparse
import csv
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import numpy as np  # noqa: E402
from vq_vae_keras.evaluation import evaluate  # noqa: E402
from vq_vae_keras.grids import codes_grid, reconstruction_grid  # noqa: E402
from vq_vae_keras.io import save_png  # noqa: E402
from vq_vae_keras.training import train_prior, train_vqvae  # noqa: E402

FIELDS = ["levels", "seed", "steps", "img_dim", "psnr", "ssim", "codes_used", "codes_used_top", "bits_per_image",
          "seconds_per_step", "prior_bits_per_image"]


def code_bits(config):
    """Bits per image of a run's code maps at a fixed rate, summed over its levels."""
    (h, w), (th, tw) = config.grid_shape, config.top_grid_shape
    bits = h * w * math.log2(config.num_codes)
    return bits + (th * tw * math.log2(config.top_codes) if config.levels == 2 else 0)


def one_run(args, levels, seed, folder):
    config = vqk.Config(img_dim=args.img_dim, z_dim=args.z_dim, num_codes=args.num_codes, batch_size=args.batch_size,
                        levels=levels, seed=seed, sample_every=10 ** 9, data=args.data, prior_heads=4)
    run = os.path.join(folder, f"levels{levels}_seed{seed}")
    started = time.perf_counter()
    train_vqvae(config, run, steps=args.steps, cache="memory", deterministic=True)
    seconds = (time.perf_counter() - started) / args.steps
    row = {"levels": levels, "seed": seed, "steps": args.steps, "img_dim": args.img_dim,
           "bits_per_image": code_bits(config), "seconds_per_step": seconds}
    if args.grids and seed == args.first_seed:
        os.makedirs(args.grids, exist_ok=True)
        held_out = vqk.load_images(args.held_out, args.img_dim)[:32]
        grid = reconstruction_grid(vqk.load_run(run, prior=False).vqvae, held_out, 8)
        save_png(os.path.join(args.grids, f"recon_levels{levels}.png"), grid)
    if args.prior_steps and seed == args.first_seed:
        train_prior(config, run, steps=args.prior_steps, deterministic=True)
        loaded = vqk.load_run(run)
        if levels == 2:
            codes = vqk.sample_levels(loaded.top_prior, loaded.prior, 64, seed=0)
        else:
            codes = vqk.sample_codes(loaded.prior, 64, config.grid_shape, seed=0)
        save_png(os.path.join(args.grids, f"samples_levels{levels}.png"), codes_grid(loaded.vqvae, codes))
        scores = evaluate(loaded, args.held_out, progress=False)
        row["prior_bits_per_image"] = scores["prior_bits_per_image"]
    else:
        scores = evaluate(run, args.held_out, progress=False)
    row.update({key: scores[key] for key in ("psnr", "ssim", "codes_used", "codes_used_top")})
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def report(rows):
    print("\n| run | bits per image | held-out PSNR (dB) | SSIM | codes used (top) | seconds per step | prior bits per image |")
    print("|---|---|---|---|---|---|---|")
    for levels in (1, 2):
        mine = [r for r in rows if int(r["levels"]) == levels]
        if not mine:
            continue
        stat = lambda key: np.array([float(r[key]) for r in mine if r.get(key) not in (None, "", "None")])  # noqa: E731
        spread = lambda v: f"{v.mean():.2f} +- {v.std(ddof=1):.2f}" if len(v) > 1 else (f"{v[0]:.2f}" if len(v) else "-")  # noqa: E731
        ssim = stat("ssim")
        top = stat("codes_used_top")
        print(f"| {'two levels' if levels == 2 else 'one level (reference)'} | {stat('bits_per_image')[0]:.0f} | "
              f"{spread(stat('psnr'))} | {ssim.mean():.3f} | {stat('codes_used').mean():.0f}"
              f"{f' ({top.mean():.0f})' if len(top) else ''} | {stat('seconds_per_step').mean():.3f} | "
              f"{spread(stat('prior_bits_per_image'))} |")
    one = [float(r["seconds_per_step"]) for r in rows if int(r["levels"]) == 1]
    two = [float(r["seconds_per_step"]) for r in rows if int(r["levels"]) == 2]
    if one and two:
        print(f"\ntwo levels / one level, seconds per step (same process): {np.mean(two) / np.mean(one):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training folder")
    parser.add_argument("--held-out", required=True, help="held-out folder")
    parser.add_argument("--img-dim", type=int, default=64)
    parser.add_argument("--z-dim", type=int, default=32)
    parser.add_argument("--num-codes", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--prior-steps", type=int, default=0)
    parser.add_argument("--grids", help="write the first seed's grids here")
    parser.add_argument("--csv", help="append a row per finished run")
    args = parser.parse_args()
    if args.prior_steps and not args.grids:
        parser.error("--prior-steps needs --grids DIR (where the sample grids go)")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for levels in (1, 2):
                row = one_run(args, levels, seed, folder)
                rows.append(row)
                if args.csv:
                    new = not os.path.exists(args.csv)
                    with open(args.csv, "a", newline="") as f:
                        writer = csv.DictWriter(f, FIELDS)
                        if new:
                            writer.writeheader()
                        writer.writerow(row)
    report(rows)


if __name__ == "__main__":
    main()
