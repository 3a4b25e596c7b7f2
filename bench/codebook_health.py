"""Codebook options side by side, several seeds each, against an equal-bitrate palette codec.

    python bench/codebook_health.py [--data DIR --held-out DIR] [--steps 1500] [--eval-at S,...]
                                    [--seeds 3] [--first-seed 0] [--options NAME,...] [--csv FILE]

Trains the default (the reference's VQ) and each option below for the same number of steps on the
same folder, once per seed, then scores held-out images through encoder -> quantizer -> decoder:
PSNR (per image on the 0..255 scale, averaged, as `sample.py evaluate`) and the fraction of codes
used. Reports each option's mean, sample standard deviation and range over the seeds.
--eval-at 1500,6000 scores each run at those steps too (one 6000-step run gives both rows: the
learning rate is constant by default, so its state at step 1500 is a 1500-step run's; an option with
a learning-rate schedule gets its rows labelled "at S of N steps" instead). "train usage" is the
fraction of codes the quantizer chose in training mode over the 500 steps before each scoring step.

Baseline row, computed in the same run: the palette codec at the VQ-VAE's bit rate. Each image
becomes its (img_dim/4)^2 thumbnail (area average), each thumbnail pixel one of num_codes colours
(k-means on the training thumbnails' pixels: log2(num_codes) bits per cell, as one code per cell),
upsampled back bilinearly. The option "no quantizer (continuous latents; not a codec)" is the other
bound: the same encoder and decoder trained on mse_x alone, z reaching the decoder unquantised.

Without --data it uses the demo's shapes (2000 to train, 500 others held out). For photographs see
bench/photos.py. --csv appends one row per finished run (a long bench keeps what it has done;
rows already in the file for the same settings are reused, not retrained; --report-only prints
the table of what the file holds).
"""

import argparse
import csv
import os
import sys
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from vq_vae_keras.codebook import kmeans, usage_counts  # noqa: E402
from vq_vae_keras.data import make_demo_images  # noqa: E402
from vq_vae_keras.evaluation import mse, psnr_from_mse, to_uint8  # noqa: E402
from vq_vae_keras.quantizers import CodebookLayer  # noqa: E402
from vq_vae_keras.training import train_vqvae  # noqa: E402

PALETTE = "palette codec (equal bit rate)"
# Not a codec: the same encoder and decoder trained on mse_x alone, z passed on unquantised (32 floats per
# cell instead of 6 bits). What this network reaches with an unlimited bit rate bounds what any codebook
# option can reach on it.
CONTINUOUS = "no quantizer (continuous latents; not a codec)"
EXISTING = {"quantizer": "ema", "kmeans_init": True, "restart_dead": 50}
# The README's recommendation (bench/README.md, "FSQ 8x8 at a higher peak rate").
RECOMMENDED = {"quantizer": "fsq", "fsq_levels": [8, 8], "lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 300}
OPTIONS = {
    "default (vq)": {},
    "fsq 8x8 + lr 3e-3 cosine warmup 300": RECOMMENDED,
    "ema + kmeans-init + restart-dead 50 + lr-schedule cosine": {**EXISTING, "lr_schedule": "cosine"},
    "lr-schedule cosine": {"lr_schedule": "cosine"},
    "ema + kmeans-init + restart-dead 50": EXISTING,
    "vq + kmeans-init + restart-dead 50": {"kmeans_init": True, "restart_dead": 50},
    "fsq 4x4x4": {"quantizer": "fsq", "fsq_levels": [4, 4, 4]},
    "fsq 8x8": {"quantizer": "fsq", "fsq_levels": [8, 8]},
    "fsq 8x8 + lr-schedule cosine": {"quantizer": "fsq", "fsq_levels": [8, 8], "lr_schedule": "cosine"},
    "fsq 16x4": {"quantizer": "fsq", "fsq_levels": [16, 4]},
    "fsq 8x8 + lr 2e-3 cosine warmup 300": {"quantizer": "fsq", "fsq_levels": [8, 8], "lr": 2e-3,
                                            "lr_schedule": "cosine", "warmup_steps": 300},
    "lr 3e-3 cosine warmup 300": {"lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 300},
    "fsq 16x4 + lr 2e-3 cosine warmup 300": {"quantizer": "fsq", "fsq_levels": [16, 4], "lr": 2e-3,
                                             "lr_schedule": "cosine", "warmup_steps": 300},
    "rotation trick": {"rotation_trick": True},
    "cosine codebook": {"cosine_codebook": True},
    "rotation + cosine": {"rotation_trick": True, "cosine_codebook": True},
    "ema + kmeans + restarts + rotation": {**EXISTING, "rotation_trick": True},
    "ema + kmeans + restarts + cosine": {**EXISTING, "cosine_codebook": True},
    "ema + kmeans + restarts + rotation + cosine": {**EXISTING, "rotation_trick": True, "cosine_codebook": True},
    "beta 0.1": {"beta": 0.1},
    "gumbel": {"quantizer": "gumbel"},
    CONTINUOUS: {},
}
USAGE_WINDOW = 500  # steps


def palette_codec(train, held_out, num_codes, seed=0):
    """(held-out PSNR, fraction of palette colours used) of the palette codec; train and held_out
    (N, d, d, 3) in [-1, 1]."""
    d = held_out.shape[1]
    thumbnail = lambda x: tf.image.resize(x, (d // 4, d // 4), method="area").numpy()  # noqa: E731
    pixels = thumbnail(train).reshape(-1, 3)
    palette = kmeans(pixels[np.random.default_rng(seed).permutation(len(pixels))[:50000]], num_codes, seed=seed)
    small = thumbnail(held_out)
    nearest = ((small[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    recon = tf.image.resize(palette[nearest], (d, d), method="bilinear").numpy()
    return float(psnr_from_mse(mse(to_uint8(held_out), to_uint8(recon))).mean()), len(np.unique(nearest)) / num_codes


def held_out_scores(vqvae, images, num_codes):
    """(held-out PSNR in dB, fraction of codes used: NaN without a quantizer) through encoder ->
    quantizer -> decoder."""
    codes, vectors = vqvae.quantize(vqvae.encode(images))
    psnr = psnr_from_mse(mse(to_uint8(images), to_uint8(vqvae.decode(vectors)))).mean()
    return float(psnr), float("nan") if codes is None else float((usage_counts(codes, num_codes) > 0).mean())


def train_continuous(config, data, steps, callbacks):
    """The VQ-VAE's encoder and decoder, z -> decoder without a quantizer, Adam on mse_x (the config's rate),
    on the batches train_vqvae would read (same images, same seeded order)."""
    from vq_vae_keras.models import build_decoder, build_encoder, learning_rate, seeded_initializers
    from vq_vae_keras.training import seed_everything, training_images

    seed_everything(config.seed, False)
    with seeded_initializers(config.seed):
        encoder, decoder = build_encoder(config), build_decoder(config)
    x = keras.Input((config.img_dim, config.img_dim, 3))
    model = keras.Model(x, decoder(encoder(x)))
    model.compile(keras.optimizers.Adam(learning_rate(config, steps)), loss="mse", jit_compile=config.jit_compile)
    _, dataset, _ = training_images(data, config, "memory")
    model.fit(dataset(0).map(lambda b: (b, b)), steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)


class ScoreAt(keras.callbacks.Callback):
    """Held-out scores at the given steps; the fraction of codes used in training mode over every
    USAGE_WINDOW steps (the quantizer's usage counts, which nothing else resets after step 1 in a
    run that never samples), and over the window before each scoring step."""

    def __init__(self, held_out, steps, num_codes):
        super().__init__()
        self.held_out, self.steps, self.num_codes = held_out, set(steps), num_codes
        self.step, self.last_counts, self.curve, self.scores = 0, 0, [], {}

    def on_train_begin(self, logs=None):
        layers = {layer.name: layer for layer in self.model.layers}
        self.vq_layer = next((layer for layer in layers.values() if isinstance(layer, CodebookLayer)), None)
        predict = lambda name: lambda x: layers[name].predict(x, batch_size=100, verbose=0)  # noqa: E731
        identity = lambda z: (None, z)  # noqa: E731  (no quantizer: no codes to count)
        self.vqvae = SimpleNamespace(encode=predict("encoder"), decode=predict("decoder"),
                                     quantize=identity if self.vq_layer is None else
                                     lambda z: [np.asarray(t) for t in self.vq_layer(z)])

    def window_usage(self):
        if self.vq_layer is None:
            return float("nan")
        counts = self.vq_layer.usage.counts.numpy()
        window = counts - self.last_counts if np.all(counts >= self.last_counts) else counts
        self.last_counts = counts
        return float((window > 0).mean())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % USAGE_WINDOW == 0 or self.step in self.steps:
            used = self.window_usage()
            self.curve.append(f"{self.step}:{used:.2f}")
            if self.step in self.steps:
                self.scores[self.step] = (*held_out_scores(self.vqvae, self.held_out, self.num_codes), used,
                                          " ".join(self.curve))


def read_rows(path):
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {(r["settings"], r["option"], int(r["seed"])): r for r in csv.DictReader(f)}


def append_row(path, row):
    if not path:
        return
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def spread(values):
    values = np.asarray(values)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():6.2f} +- {std:4.2f} [{values.min():.2f}, {values.max():.2f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="training folder (default: the demo's shapes)")
    parser.add_argument("--held-out", help="held-out folder (default: other demo shapes)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-at", help="comma-separated steps to score at as well (default: only --steps)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per option")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train seeds from this one (another process has the others)")
    parser.add_argument("--options", help=f"comma-separated names (default: all): {', '.join(OPTIONS)}")
    parser.add_argument("--img-dim", type=int, default=32)
    parser.add_argument("--z-dim", type=int, default=32)
    parser.add_argument("--num-codes", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--csv", help="append a row per finished run here; reuse rows already there")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the --csv rows")
    args = parser.parse_args()
    names = args.options.split(",") if args.options else list(OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"unknown options: {', '.join(unknown)}")
    eval_at = sorted({args.steps, *(int(s) for s in args.eval_at.split(",") if s)} if args.eval_at else {args.steps})
    if eval_at[0] < 1 or eval_at[-1] > args.steps:
        parser.error(f"--eval-at steps must be in 1..{args.steps}")

    def settings(name, step):
        constant = OPTIONS[name].get("lr_schedule", "constant") == "constant" and not OPTIONS[name].get("warmup_steps")
        at = f"steps {step}" if constant or step == args.steps else f"steps {step} of {args.steps}"
        return (f"{os.path.abspath(args.data) if args.data else 'shapes'} held-out "
                f"{os.path.abspath(args.held_out) if args.held_out else 'shapes'} {at} img {args.img_dim} "
                f"z {args.z_dim} codes {args.num_codes} batch {args.batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_demo_images(os.path.join(tmp, "train"), count=2000, size=64, seed=0)
        held_out = vqk.load_images(args.held_out or make_demo_images(os.path.join(tmp, "held_out"), count=500,
                                                                     size=64, seed=1), args.img_dim)
        palette, palette_used = palette_codec(vqk.load_images(data, args.img_dim), held_out, args.num_codes)
        print(f"{PALETTE}: held-out psnr {palette:.2f} dB, colours used {palette_used:.2f}", flush=True)
        rows = read_rows(args.csv)
        # seed-major: a bench cut short still has every option at seed 0
        for seed in range(args.first_seed, args.seeds):
            for name in names:
                if args.report_only or all((settings(name, s), name, seed) in rows for s in eval_at):
                    continue
                config = vqk.Config(data=data, img_dim=args.img_dim, z_dim=args.z_dim, num_codes=args.num_codes,
                                    batch_size=args.batch_size, seed=seed, sample_every=10**9, **OPTIONS[name])
                score = ScoreAt(held_out, eval_at, args.num_codes)
                if name == CONTINUOUS:
                    train_continuous(config, data, args.steps, [score])
                else:
                    train_vqvae(config, os.path.join(tmp, f"run_{len(rows)}"), steps=args.steps,
                                deterministic=True, callbacks=[score])
                for step, (psnr, used, train_used, curve) in sorted(score.scores.items()):
                    row = {"settings": settings(name, step), "option": name, "seed": seed, "psnr": psnr,
                           "codes_used": used, "train_usage": train_used, "usage_curve": curve}
                    rows[row["settings"], name, seed] = row
                    append_row(args.csv, row)
                    print(f"{name}, seed {seed}, step {step}: psnr {psnr:.2f} dB, codes used {used:.2f}, "
                          f"train usage {train_used:.2f}", flush=True)

    for step in eval_at:
        print(f"\n{step} steps, {args.img_dim} px, z_dim {args.z_dim}, {args.num_codes} codes, batch "
              f"{args.batch_size}, {len(held_out)} held-out images; "
              f"mean +- std [min, max] over seeds 0..{args.seeds - 1}")
        print("| run | seeds | held-out PSNR (dB) | vs palette (dB) | codes used (held-out) | train usage |\n"
              "|---|---|---|---|---|---|")
        print(f"| {PALETTE} | - | {palette:6.2f} | 0 | {palette_used:6.2f} | - |")
        for name in names:
            keys = [(settings(name, step), name, s) for s in range(args.seeds)]
            runs = [rows[key] for key in keys if key in rows]
            if not runs:
                continue
            psnrs = [float(r["psnr"]) for r in runs]
            train = [float(r["train_usage"]) for r in runs if r.get("train_usage")]
            label = name if "of" not in settings(name, step).split() else f"{name} (at {step} of {args.steps})"
            codes = "-" if name == CONTINUOUS else spread([float(r["codes_used"]) for r in runs])
            train = "-" if name == CONTINUOUS or not train else spread(train)
            print(f"| {label} | {len(runs)} | {spread(psnrs)} | {np.mean(psnrs) - palette:+.2f} | {codes} | {train} |")


if __name__ == "__main__":
    main()
