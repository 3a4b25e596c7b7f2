"""Pictures from a trained run.

    python sample.py recon  --run RUN --data DIR [--no-quantize]   # real | reconstruction columns
    python sample.py interp --run RUN --data DIR                   # rows from one image to another
    python sample.py random --run RUN [--temperature T] [--top-k K] [--top-p P] [--class NAME ...]
    python sample.py usage  --run RUN --data DIR                   # code-usage histogram over a folder
    python sample.py evaluate --run RUN --data DIR [--fid N]       # PSNR, SSIM, usage, bits/dim, FID
"""

import argparse
import os

import numpy as np

# A command's own process: TensorFlow's C++ log lines (an "E0000 ... cuInit" line on every machine
# without a GPU, XLA notices) stay hidden unless TF_CPP_MIN_LOG_LEVEL or VQK_VERBOSE_TF asks otherwise.
if not os.environ.get("VQK_VERBOSE_TF"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import vq_vae_keras  # noqa: F401, E402  (quiets TensorFlow's start-up logging)
from vq_vae_keras.cli import (ArgumentParser, count, folder, grid_size, output_file, positive_float, positive_int, probability,
                              run_main, seed_int)
from vq_vae_keras.errors import UsageError


def build_parser():
    parser = ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, needs_data in [("recon", "reconstruction grid", True),
                                        ("interp", "interpolation grid", True),
                                        ("random", "random samples from the prior", False),
                                        ("usage", "code-usage histogram over a folder (text and PNG)", True)]:
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--run", required=True, type=folder, help="run directory")
        if needs_data:
            p.add_argument("--data", required=True, type=folder, help="folder of images")
        p.add_argument("--out", type=output_file(".png"), help=f"PNG to write (default RUN/samples/{name}.png)")
        if name == "usage":
            continue
        p.add_argument("--n", type=grid_size, default=8, help="grid of n x n tiles (default 8, at most 64)")
        p.add_argument("--seed", type=seed_int, help="repeat an earlier call's draws (default: a fresh seed, printed)")
        if name == "recon":
            p.add_argument("--no-quantize", action="store_true", help="encoder -> decoder, skipping the quantizer")
        if name == "random":
            p.add_argument("--temperature", type=positive_float, default=1.0)
            p.add_argument("--top-k", type=positive_int, help="draw only from the k likeliest codes")
            p.add_argument("--top-p", type=probability, help="draw only from the fewest likeliest codes whose "
                           "probability reaches P, in (0, 1] (nucleus sampling)")
            p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                           help="class-conditional priors: samples of this class; repeat for rows per class "
                                "(default: every class in turn)")
            p.add_argument("--codes-out", type=output_file(".npy"),
                           help="also save the sampled code maps (n*n, h, w) as .npy")
    add_evaluate_parser(commands)
    return parser


def fresh_seed():
    """A new seed each call, as the reference drew fresh samples; printed so a call can be repeated."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 31)
    print(f"seed {seed}: pass --seed {seed} to repeat")
    return seed


def main(argv=None):
    args = build_parser().parse_args(argv)
    from vq_vae_keras.data import ImageFolder
    from vq_vae_keras.grids import codes_grid, interpolation_grid, reconstruction_grid
    from vq_vae_keras.io import save_npy, save_png
    from vq_vae_keras.run import load_run

    if args.command == "evaluate":
        return evaluate_command(args)
    run = load_run(args.run, prior=args.command == "random")  # a broken prior must not block the rest
    out = args.out or os.path.join(args.run, "samples", f"{args.command}.png")
    if args.command == "usage":
        return usage(run, args.data, out)
    seed = fresh_seed() if args.seed is None else args.seed
    rng = np.random.default_rng(seed)
    if args.command == "recon":
        if args.n % 2:
            raise UsageError(f"--n must be even for recon (pairs of real and reconstructed), got {args.n}")
        images = ImageFolder(args.data, run.config.img_dim).random_images(args.n * args.n // 2, rng)
        grid = reconstruction_grid(run.vqvae, images, args.n, quantize=not args.no_quantize)
    elif args.command == "interp":
        if args.n < 2:
            raise UsageError(f"--n must be at least 2 for interp, got {args.n}")
        images = ImageFolder(args.data, run.config.img_dim).random_images(2 * args.n, rng)
        grid = interpolation_grid(run.vqvae, images[0::2], images[1::2], args.n)
    else:
        from vq_vae_keras.sampling import sample_codes

        if run.prior is None:
            raise UsageError(f"{args.run} has no trained prior; run: python train.py prior --run {args.run}")
        if args.top_k is not None and args.top_k > run.config.num_codes:
            raise UsageError(f"--top-k must be at most num_codes = {run.config.num_codes}, got {args.top_k}")
        classes = None
        if args.classes:
            if len(args.classes) > args.n:
                raise UsageError(f"--class given {len(args.classes)} times, but the grid has only {args.n} rows (--n)")
            if run.config.classes is None:
                raise UsageError(f"--class: the prior of {args.run} is not class-conditional (train.py prior --classes)")
            unknown = [name for name in args.classes if name not in run.config.classes]
            if unknown:
                raise UsageError(f"--class {unknown[0]}: unknown class; this run's classes are "
                                 f"{', '.join(run.config.classes)}")
            # rows per class: grid row r shows the (r * len(names) // n)-th named class
            classes = [args.classes[(i // args.n) * len(args.classes) // args.n] for i in range(args.n * args.n)]
        codes = sample_codes(run.prior, args.n * args.n, run.config.grid_shape, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=seed, progress=True, classes=classes)
        if args.codes_out:
            save_npy(args.codes_out, codes)
        grid = codes_grid(run.vqvae, codes)
    save_png(out, grid)
    print(out)


def usage(run, data, out):
    """How often each code is chosen over every image of a folder: printed and drawn."""
    from vq_vae_keras.codebook import histogram_image, histogram_text, summary, usage_counts
    from vq_vae_keras.data import ImageFolder
    from vq_vae_keras.io import save_png
    from vq_vae_keras.prior import encode_folder

    folder = ImageFolder(data, run.config.img_dim)
    counts = usage_counts(encode_folder(run.vqvae, folder, run.config.batch_size), run.config.num_codes)
    print(" code     count  share")
    print(histogram_text(counts))
    print(f"{len(folder)} images, {counts.sum()} code positions: {summary(counts)}")
    save_png(out, histogram_image(counts))
    print(out)


def add_evaluate_parser(commands):
    p = commands.add_parser("evaluate", help="PSNR, SSIM, codebook usage, prior bits/dim and FID on a folder")
    p.add_argument("--run", required=True, type=folder)
    p.add_argument("--data", required=True, type=folder, help="folder of held-out images")
    p.add_argument("--json", type=output_file(".json"), help="where to write the results (default RUN/eval.json)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--fid", type=count, metavar="N", help="also rFID, and FID of N samples from the prior (N >= 2)")
    p.add_argument("--inception-weights", default="imagenet", metavar="imagenet|none|FILE.h5",
                   help="InceptionV3 weights for FID: Keras's ImageNet download (default), its .h5 file, "
                        "or none (random weights: for testing the pipeline only)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the prior samples for FID")


def evaluate_command(args):
    """Scores of a run on a folder: printed as a table and written as JSON."""
    import json

    from vq_vae_keras.evaluation import evaluate, format_table
    from vq_vae_keras.io import atomic_write_text

    out = args.json or os.path.join(args.run, "eval.json")
    if os.path.isdir(out):
        raise UsageError(f"--json {out} is a folder; give a file name")
    if args.fid is not None and args.fid < 2:
        raise UsageError(f"--fid needs at least 2 samples, got {args.fid}")
    results = evaluate(args.run, args.data, batch_size=args.batch_size, fid=args.fid,
                       inception_weights=args.inception_weights, seed=args.seed)
    print(format_table(results))
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    run_main(main)
