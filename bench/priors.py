"""Attention prior (the reference's PixelAtt) vs gated PixelCNN, on the same code maps.

    python bench/priors.py [--data DIR] [--img-dim 32] [--vqvae-steps 300] [--seconds 120]
                           [--rounds 6] [--n 16] [--pixelcnn-depth 16] [--pixelcnn-width 128]

Su Jianlin notes that his attention prior beat his PixelCNN but needed much more memory. This
checks both halves on one VQ-VAE's code maps (the built-in shapes without --data):
  1. validation NLL (nats per code, 10% of the maps held out) after the same training wall time:
     the two priors train in alternating rounds of --seconds / --rounds each (so both share the
     machine's load alike), the first step (tracing) not counted; NLL after every round;
  2. peak memory of one training step at batch 32 on the reference's 32x32 grid (--memory-img-dim),
     each in a child process (GPU: TensorFlow's peak allocation; CPU: how far the step raises the
     process's peak RSS above the built model's);
  3. sampling time for --n samples: first call (compilation included) and second call.
Every comparison is a ratio of figures measured in this run.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from vq_vae_keras.data import ImageFolder, epoch_batches, make_demo_images  # noqa: E402
from vq_vae_keras.priors.tokens import codes_to_tokens, prior_nll  # noqa: E402

KINDS = ("attention", "pixelcnn")


def config_for(args, kind):
    return vqk.Config(img_dim=args.img_dim, prior=kind, pixelcnn_depth=args.pixelcnn_depth,
                      pixelcnn_width=args.pixelcnn_width, prior_batch_size=32)


def compiled_prior(config):
    prior = vqk.build_prior(config)
    prior.compile(keras.optimizers.Adam(config.prior_lr), "sparse_categorical_crossentropy")
    return prior


def memory_child(kind, img_dim, depth, width):
    """One training step of a fresh prior at batch 32: prints the peak memory in GiB."""
    args = argparse.Namespace(img_dim=img_dim, pixelcnn_depth=depth, pixelcnn_width=width)
    config = config_for(args, kind)
    prior = compiled_prior(config)
    h, w = config.grid_shape
    tokens = codes_to_tokens(np.random.default_rng(0).integers(0, config.num_codes, (32, h, w)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prior.train_on_batch(tokens[:, :-1], tokens[:, 1:] - 1)
    if tf.config.list_logical_devices("GPU"):
        print(f"{tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2 ** 30:.3f} GPU-peak")
    else:  # the step's own share: the high-water mark's rise over the model's (TensorFlow itself is ~1 GiB)
        print(f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20:.3f} RSS-rise")


def code_maps(args):
    """Code maps of the folder's images through a VQ-VAE trained here for --vqvae-steps."""
    work = tempfile.mkdtemp(prefix="bench_priors_")
    data = args.data or make_demo_images(os.path.join(work, "shapes"), count=600, size=args.img_dim)
    config = vqk.Config(img_dim=args.img_dim, data=data, sample_every=10 ** 9)
    vqvae = vqk.train_vqvae(config, os.path.join(work, "run"), steps=args.vqvae_steps)
    return vqvae.encode_folder(ImageFolder(data, args.img_dim), 64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of images (default: the built-in shapes, 600 images)")
    parser.add_argument("--img-dim", type=int, default=32, help="image size (grid img_dim/4; default 32)")
    parser.add_argument("--vqvae-steps", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=120, help="training wall time per prior (default 120)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--n", type=int, default=16, help="samples for the sampling time (default 16)")
    parser.add_argument("--memory-img-dim", type=int, default=128,
                        help="image size for the memory figure (default 128: the reference's 32x32 grid)")
    parser.add_argument("--pixelcnn-depth", type=int, default=16)
    parser.add_argument("--pixelcnn-width", type=int, default=128)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    codes = code_maps(args)
    tokens = codes_to_tokens(codes)
    order = np.random.default_rng(0).permutation(len(tokens))
    n_val = max(1, len(tokens) // 10)
    val, train = tokens[order[:n_val]], tokens[order[n_val:]]
    print(f"{len(train)} training and {len(val)} validation code maps of {codes.shape[1]}x{codes.shape[2]}; "
          f"uniform NLL {np.log(64):.3f}")

    priors = {kind: compiled_prior(config_for(args, kind)) for kind in KINDS}
    batches = {kind: epoch_batches(len(train), 32, seed=0) for kind in KINDS}
    spent, steps = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)

    def step(kind):
        indices = next(batches[kind])
        if len(indices) < 32:  # an epoch's short last batch would be traced anew: skip it
            indices = next(batches[kind])
        batch = train[indices]
        priors[kind].train_on_batch(batch[:, :-1], batch[:, 1:] - 1)

    for kind in KINDS:
        step(kind)  # tracing: not counted
    print(f"\nvalidation NLL after equal training wall time ({args.rounds} alternating rounds):")
    print(f"{'seconds':>8}" + "".join(f"{kind:>12}" for kind in KINDS) + "  (seconds: attention's; pixelcnn's)")
    for _ in range(args.rounds):
        for kind in KINDS:
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds / args.rounds:
                step(kind)
                steps[kind] += 1
            spent[kind] += time.perf_counter() - start
        nll = {kind: prior_nll(priors[kind], val) for kind in KINDS}
        print(f"{spent['attention']:8.0f}" + "".join(f"{nll[kind]:12.4f}" for kind in KINDS) + f"  ({spent['pixelcnn']:.0f})")
    print("steps: " + ", ".join(f"{kind} {steps[kind]}" for kind in KINDS)
          + f" (pixelcnn/attention step time {spent['pixelcnn'] / steps['pixelcnn'] / (spent['attention'] / steps['attention']):.2f}x)")
    print(f"final NLL ratio pixelcnn/attention: {nll['pixelcnn'] / nll['attention']:.3f}")

    peaks = {}
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(args.memory_img_dim),
                              str(args.pixelcnn_depth), str(args.pixelcnn_width)],
                             capture_output=True, text=True, check=True)
        peaks[kind] = out.stdout.split()[-2:]
    unit = peaks["attention"][1]
    side = args.memory_img_dim // 4
    print(f"\npeak memory of one training step, {side}x{side} grid, batch 32 ({unit}): "
          + ", ".join(f"{kind} {float(peaks[kind][0]):.3f} GiB" for kind in KINDS)
          + f"; attention/pixelcnn {float(peaks['attention'][0]) / float(peaks['pixelcnn'][0]):.2f}x")

    grid = codes.shape[1:]
    times = {}
    for kind in KINDS:
        first = time.perf_counter()
        vqk.sample_codes(priors[kind], args.n, grid, seed=0)
        second = time.perf_counter()
        vqk.sample_codes(priors[kind], args.n, grid, seed=1)
        times[kind] = (second - first, time.perf_counter() - second)
    print(f"\nsampling {args.n} code maps: "
          + ", ".join(f"{kind} {times[kind][0]:.1f} s first call, {times[kind][1]:.2f} s second" for kind in KINDS)
          + f"; pixelcnn/attention (2nd call) {times['pixelcnn'][1] / times['attention'][1]:.2f}x")


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        i = sys.argv.index("--memory-child")
        memory_child(sys.argv[i + 1], int(sys.argv[i + 2]), int(sys.argv[i + 3]), int(sys.argv[i + 4]))
    else:
        main()
