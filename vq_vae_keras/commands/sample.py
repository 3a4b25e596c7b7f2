"""Pictures and scores from a trained run.

{recon}  # real | reconstruction columns
{interp}  # rows from one image to another
{random}  # samples from the prior
{usage}  # how often each code is used, over a folder
{evaluate}  # PSNR, SSIM, usage, bits/dim, FID
"""

import argparse
import os

import numpy as np

from ..cli import (ArgumentParser, count, folder, grid_size, import_tensorflow, output_file, positive_float,
                   positive_int, probability, console, seed_int)
from ..errors import UsageError


def description(prog):
    command = f"python {prog}" if prog.endswith(".py") else prog
    lines = {"recon": "recon  --run RUN --data DIR [--no-quantize]", "interp": "interp --run RUN --data DIR",
             "random": "random --run RUN [--temperature T] [--top-k K] [...]",
             "usage": "usage  --run RUN --data DIR", "evaluate": "evaluate --run RUN --data DIR [--fid N]"}
    width = max(map(len, lines.values()))
    return __doc__.format(**{k: f"    {command} {v.ljust(width)}" for k, v in lines.items()})


def build_parser(prog="sample.py"):
    parser = ArgumentParser(prog=prog, description=description(prog),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, needs_data in [("recon", "reconstruction grid", True),
                                        ("interp", "interpolation grid", True),
                                        ("random", "random samples from the prior", False),
                                        ("usage", "code-usage histogram over a folder (text and PNG)", True)]:
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--run", required=True, type=folder, help="run directory")
        if needs_data:
            p.add_argument("--data", required=True, type=folder, help="folder of images")
        p.add_argument("--out", type=output_file(".png"), help=f"PNG to write (default: RUN/samples/{name}.png)")
        if name == "usage":
            continue
        p.add_argument("--n", type=grid_size, default=8, help="grid of n x n tiles, at most 64 (default: %(default)s)")
        p.add_argument("--seed", type=seed_int, help="repeat an earlier call's draws (default: a fresh seed, printed)")
        if name == "recon":
            p.add_argument("--no-quantize", action="store_true",
                           help="encoder -> decoder without the choice of codes (FSQ: its channels unrounded; "
                                "Gumbel: its mixture without noise)")
        if name == "random":
            p.add_argument("--temperature", type=positive_float, default=1.0,
                           help="divide the prior's logits by T: below 1 safer, above 1 more varied (default: %(default)s)")
            p.add_argument("--top-k", type=positive_int, help="draw only from the k likeliest codes (default: all)")
            p.add_argument("--top-p", type=probability, help="draw only from the fewest likeliest codes whose "
                           "probability reaches P, in (0, 1] (nucleus sampling; default: all)")
            p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                           help="class-conditional priors: samples of this class; repeat for rows per class "
                                "(default: every class in turn)")
            p.add_argument("--codes-out", type=output_file(".npy"),
                           help="also save the sampled code maps (n*n, h, w) as .npy (a two-level run: the "
                                "bottom maps; the top maps beside them, in FILE_top.npy)")
    add_evaluate_parser(commands)
    return parser


def add_evaluate_parser(commands):
    p = commands.add_parser("evaluate", help="PSNR, SSIM, codebook usage, prior bits/dim and FID on a folder")
    p.add_argument("--run", required=True, type=folder, help="run directory")
    p.add_argument("--data", required=True, type=folder, help="folder of held-out images")
    p.add_argument("--json", type=output_file(".json"), help="where to write the results (default: RUN/eval.json)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--fid", type=count, metavar="N", help="also rFID, and FID of N samples from the prior (N >= 2)")
    p.add_argument("--inception-weights", default="imagenet", metavar="imagenet|none|FILE.h5",
                   help="InceptionV3 weights for FID: Keras's ImageNet download, its .h5 file, "
                        "or none (random weights: for testing the pipeline only) (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the prior samples for FID (default: %(default)s)")


def fresh_seed():
    """A new seed each call, as the reference drew fresh samples (printed once something is drawn)."""
    return int(np.random.SeedSequence().entropy % 2 ** 31)


def main(argv=None, prog="sample.py"):
    args = build_parser(prog).parse_args(argv)
    if args.command == "evaluate":
        return evaluate_command(args)
    if args.command == "recon" and args.n % 2:
        raise UsageError(f"--n must be even for recon (pairs of real and reconstructed), got {args.n}")
    if args.command == "interp" and args.n < 2:
        raise UsageError(f"--n must be at least 2 for interp, got {args.n}")
    if args.command == "random" and args.classes and len(args.classes) > args.n:
        raise UsageError(f"--class given {len(args.classes)} times, but the grid has only {args.n} rows (--n)")
    import_tensorflow()
    if args.command == "random":
        from ..priors.sampling import use_compile_cache
        from ..rundir import RunDir

        use_compile_cache(RunDir(args.run).xla_cache, now=True)  # before TensorFlow's first op
    from ..data import ImageFolder
    from ..grids import codes_grid, interpolation_grid, reconstruction_grid
    from ..io import save_npy, save_png
    from ..run import load_run

    run = load_run(args.run, prior=args.command == "random")  # a broken prior must not block the rest
    out = args.out or os.path.join(args.run, "samples", f"{args.command}.png")
    if args.command == "usage":
        return usage(run, args.run, args.data, out)
    seed = fresh_seed() if args.seed is None else args.seed
    rng = np.random.default_rng(seed)
    if args.command == "recon":
        images = ImageFolder(args.data, run.config.img_dim).random_images(args.n * args.n // 2, rng)
        grid = reconstruction_grid(run.vqvae, images, args.n, quantize=not args.no_quantize)
    elif args.command == "interp":
        images = ImageFolder(args.data, run.config.img_dim).random_images(2 * args.n, rng)
        grid = interpolation_grid(run.vqvae, images[0::2], images[1::2], args.n)
    else:
        from ..priors.sampling import sample_codes, sample_levels

        two = run.config.levels == 2
        if run.prior is None or (two and run.top_prior is None):
            level = "" if not two else "top" if run.top_prior is None else "bottom"
            raise UsageError(f"{args.run} has no trained {level + ' ' if level else ''}prior; run: python train.py "
                             f"prior --run {args.run}" + (" --level bottom" if level == "bottom" else ""))
        least = min(run.config.num_codes, run.config.top_codes) if two else run.config.num_codes
        if args.top_k is not None and args.top_k > least:
            raise UsageError(f"--top-k must be at most num_codes = {least}" + (" (the smaller level's)" if two else "")
                             + f", got {args.top_k}")
        classes = None
        if args.classes:
            if run.config.classes is None:
                raise UsageError(f"--class: the prior of {args.run} is not class-conditional (train.py prior --classes)")
            unknown = [name for name in args.classes if name not in run.config.classes]
            if unknown:
                raise UsageError(f"--class {unknown[0]}: unknown class; this run's classes are "
                                 f"{', '.join(run.config.classes)}")
            # rows per class: grid row r shows the (r * len(names) // n)-th named class
            classes = [args.classes[(i // args.n) * len(args.classes) // args.n] for i in range(args.n * args.n)]
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed, progress=True,
                       classes=classes)
        if two:  # top maps from the top prior, then each bottom map under its top map
            codes = sample_levels(run.top_prior, run.prior, args.n * args.n, **options)
        else:
            codes = sample_codes(run.prior, args.n * args.n, run.config.grid_shape, **options)
        if args.codes_out:
            save_npy(args.codes_out, codes[0] if two else codes)
            if two:
                save_npy(args.codes_out[:-len(".npy")] + "_top.npy", codes[1])
        grid = codes_grid(run.vqvae, codes)
    if args.seed is None:  # drawn: now the seed is worth repeating
        print(f"seed {seed}: pass --seed {seed} to repeat")
    save_png(out, grid)
    print(out)


def usage(run, run_dir, data, out):
    """How often each code is chosen over every image of a folder: printed and drawn. A two-level
    run: the bottom level's, then the top level's (drawn into OUT with _top before .png)."""
    from ..codebook import histogram_image, histogram_text, summary, usage_counts
    from ..data import ImageFolder
    from ..io import save_png

    folder = ImageFolder(data, run.config.img_dim)
    codes = run.vqvae.encode_folder(folder, run.config.batch_size)
    # What is counted: each image's codes in inference mode (training's last line counts the
    # training-mode assignments of its last window's batches, which can differ).
    what = f"in inference over the {len(folder)} images of {data}"
    layers = run.vqvae.vq_layers
    levels = [("", codes, layers[0], out)] if len(layers) == 1 else \
        [("bottom level", codes[0], layers[0], out), ("top level", codes[1], layers[1], out[:-len(".png")] + "_top.png")]
    for level, level_codes, layer, path in levels:
        counts = usage_counts(level_codes, layer.num_codes)
        if level:
            print(f"{level}:")
        print(" code     count  share")
        print(histogram_text(counts))
        print(f"{level + ': ' if level else ''}{counts.sum()} code positions: {summary(counts, counted=what)}")
        title = f"{level + ' ' if level else ''}code usage of {run_dir}"
        save_png(path, histogram_image(counts, title=title, subtitle=f"counted {what}"))
        print(path)


def evaluate_command(args):
    """Scores of a run on a folder: printed as a table and written as JSON."""
    import json

    out = args.json or os.path.join(args.run, "eval.json")
    if os.path.isdir(out):
        raise UsageError(f"--json {out} is a folder; give a file name")
    if args.fid is not None and args.fid < 2:
        raise UsageError(f"--fid needs at least 2 samples, got {args.fid}")
    import_tensorflow()
    from ..evaluation import evaluate, format_table
    from ..io import atomic_write_text

    results = evaluate(args.run, args.data, batch_size=args.batch_size, fid=args.fid,
                       inception_weights=args.inception_weights, seed=args.seed)
    print(format_table(results))
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(out)


def run():
    """The console script (vqk-sample), `python -m vq_vae_keras.commands.sample` and sample.py."""
    console(main)


if __name__ == "__main__":
    run()
