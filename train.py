"""Train a VQ-VAE and its prior (attention, or a gated PixelCNN) on a folder of images.

    python train.py                                   # demo: built-in shapes, 32 px, both stages
    python train.py vqvae --data DIR --run RUN [...]  # stage 1: the VQ-VAE
    python train.py prior --run RUN [...]             # stage 2: the prior over its codes
"""

import argparse
import math
import os
import sys

# A command's own process: TensorFlow's C++ log lines (an "E0000 ... cuInit" line on every machine
# without a GPU, XLA notices) stay hidden unless TF_CPP_MIN_LOG_LEVEL or VQK_VERBOSE_TF asks otherwise.
if not os.environ.get("VQK_VERBOSE_TF"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import vq_vae_keras  # noqa: F401, E402  (quiets TensorFlow's start-up logging)
from vq_vae_keras.cli import (ArgumentParser, add_steps_flags, apply_flags, check_options_apply, config_for_run, folder,
                              nonnegative_float, nonnegative_int, not_a_file, output_file, positive_float, positive_int,
                              run_main, seed_int, unit_interval, validate_flags)
from vq_vae_keras.config import Config
from vq_vae_keras.distribute import is_chief
from vq_vae_keras.errors import UsageError

DEMO_RUN = os.path.join("runs", "demo")


def build_parser():
    parser = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    vq = commands.add_parser("vqvae", help="train the VQ-VAE")
    vq.add_argument("--data", required=True, type=folder, help="folder of images (searched recursively)")
    vq.add_argument("--run", required=True, type=not_a_file, help="run directory")
    vq.add_argument("--img-dim", type=int)
    vq.add_argument("--z-dim", type=positive_int)
    vq.add_argument("--num-codes", type=positive_int)
    vq.add_argument("--batch-size", type=positive_int)
    vq.add_argument("--lr", type=positive_float)
    vq.add_argument("--beta", type=nonnegative_float)
    vq.add_argument("--sample-every", type=positive_int, help="grids and checkpoint every N steps (default 100)")
    vq.add_argument("--seed", type=seed_int)
    health = vq.add_argument_group("codebook options (departures from the reference, off by default)")
    health.add_argument("--quantizer", choices=["vq", "ema", "gumbel", "fsq"],
                        help="vq: the reference; ema: codebook moved by exponential moving averages; "
                             "gumbel: Gumbel-softmax relaxation (DALL-E's dVAE); fsq: finite scalar quantization")
    health.add_argument("--fsq-levels", type=fsq_levels, metavar="L1,L2,...",
                        help="fsq: values per channel, e.g. 4,4,4 (their product is the number of codes; "
                             "--num-codes may be left out)")
    health.add_argument("--rotation-trick", action="store_true", default=None,
                        help="vq, ema: gradient to the encoder by the rotation trick instead of the straight-through copy")
    health.add_argument("--cosine-codebook", action="store_true", default=None,
                        help="vq, ema: l2-normalise z and the code vectors (nearest code by cosine similarity)")
    health.add_argument("--ema-decay", type=unit_interval, help="EMA decay (default 0.99)")
    health.add_argument("--restart-dead", type=nonnegative_int, metavar="N",
                        help="move a code unused for N steps to a random encoder output of the batch")
    health.add_argument("--kmeans-init", action="store_true", default=None,
                        help="initialise the codebook by k-means on the first batch's encoder outputs")
    health.add_argument("--gumbel-temperature", type=positive_float, help="start temperature (default 1)")
    health.add_argument("--gumbel-temperature-end", type=positive_float, help="end temperature (default 1/16)")
    health.add_argument("--gumbel-anneal-steps", type=positive_int, help="steps from start to end (default 5000)")
    health.add_argument("--gumbel-schedule", choices=["cosine", "linear", "exponential"], help="default cosine")
    health.add_argument("--gumbel-kl-weight", type=nonnegative_float, help="weight of KL to uniform (default 5e-4)")
    vq.add_argument("--cache", nargs="?", const="memory", type=cache_file, metavar="FILE.npz",
                    help="decode and resize the images once, keep them in memory (and in FILE.npz if given, "
                         "reused by later runs); same results, for folders that fit in memory. Without it, "
                         "folders whose decoded images take at most 256 MiB are kept in memory anyway")
    add_steps_flags(vq)
    speed = vq.add_argument_group("speed (results within float noise of float32 without XLA)")
    speed.add_argument("--precision", choices=["float32", "mixed_bfloat16", "mixed_float16"],
                       help="float32 (default, the reference) or mixed precision; the quantizer stays float32")
    speed.add_argument("--jit", dest="jit_compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the training step with XLA (default: on; --no-jit: off)")
    vq.add_argument("--tensorboard", action="store_true", help="write RUN/tensorboard/ (tensorboard --logdir RUN/tensorboard)")
    vq.add_argument("--eval-data", type=folder, metavar="DIR",
                    help="held-out images scored every --eval-every steps: psnr, ssim, codes_used in RUN/eval_log.csv")
    vq.add_argument("--eval-every", type=positive_int, metavar="N", help="steps between evaluations (default 1000)")
    add_distribute_flags(vq)
    vq.add_argument("--sync-batchnorm", action="store_true", default=None,
                    help="under --distribute: BatchNorm statistics of the global batch (N replicas compute what one "
                         "device computes), not of each replica's slice")

    prior = commands.add_parser("prior", help="train the prior (attention or PixelCNN) on a trained VQ-VAE's codes")
    prior.add_argument("--run", required=True, type=folder, help="run directory of a trained VQ-VAE")
    prior.add_argument("--data", type=folder, help="folder of images (default: the one in RUN/config.json)")
    prior.add_argument("--batch-size", type=positive_int, help="default 32")
    prior.add_argument("--seed", type=seed_int)
    add_steps_flags(prior, restart=True)
    prior.add_argument("--val-split", type=nonnegative_float, metavar="F",
                       help="hold out this fraction of the code maps for val_nll (default 0: train on all, as the reference)")
    prior.add_argument("--sample-every-epochs", type=nonnegative_int, metavar="N",
                       help="grid of prior samples every N epochs (default 1; 0: never)")
    prior.add_argument("--jit", dest="prior_jit_compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the prior's training step with XLA (default: off)")
    prior.add_argument("--tensorboard", action="store_true", help="write RUN/tensorboard/prior/")
    kinds = prior.add_argument_group("prior kind and classes (departures from the reference, off by default)")
    kinds.add_argument("--prior", choices=["attention", "pixelcnn"],
                       help="attention: the reference's PixelAtt (default); pixelcnn: a gated PixelCNN")
    kinds.add_argument("--pixelcnn-width", type=positive_int, metavar="C", help="channels of both stacks (default 128)")
    kinds.add_argument("--pixelcnn-depth", type=positive_int, metavar="L", help="gated layers (default 16)")
    kinds.add_argument("--pixelcnn-kernel", type=positive_int, metavar="K", help="odd kernel size >= 3 (default 5)")
    kinds.add_argument("--classes", action="store_true",
                       help="class-conditional prior: each image's class is its first-level subfolder of --data")
    add_distribute_flags(prior)
    return parser


def add_distribute_flags(parser):
    group = parser.add_argument_group("several devices (README: Scaling)")
    group.add_argument("--distribute", choices=["none", "mirrored", "multiworker"], default="none",
                       help="none: one device (default); mirrored: every local GPU (or --cpu-replicas); multiworker: "
                            "one process per machine, cluster from TF_CONFIG. --batch-size is the global batch")
    group.add_argument("--cpu-replicas", type=positive_int, metavar="N",
                       help="with --distribute mirrored: split the CPU into N devices (to try it out)")


def strategy_for(args, jit_field):
    """The tf.distribute strategy the flags ask for (None: one device). XLA cannot compile a
    distributed step: --jit with --distribute is an error, and XLA is off by default there."""
    from vq_vae_keras.distribute import make_strategy

    if args.distribute == "none":
        if args.cpu_replicas is not None:
            raise UsageError("--cpu-replicas applies to --distribute mirrored")
        if getattr(args, "sync_batchnorm", None):
            raise UsageError("--sync-batchnorm applies to --distribute mirrored|multiworker (one device sees its whole batch)")
        return None
    if getattr(args, jit_field):
        raise UsageError("--jit: XLA does not compile a distributed training step; leave --jit out with --distribute")
    return make_strategy(args.distribute, args.cpu_replicas)


def fsq_levels(text):
    """An argparse type: comma-separated integers, each at least 2."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 4,4,4") from None
    if min(levels) < 2:
        raise argparse.ArgumentTypeError(f"each level must be at least 2, got {text}")
    return levels


def cache_file(text):
    return text if text == "memory" else output_file(".npz")(text)


def train_vqvae_command(args):
    from vq_vae_keras.training import train_vqvae

    names = ["data", "img_dim", "z_dim", "num_codes", "batch_size", "lr", "beta", "sample_every", "seed",
             "quantizer", "ema_decay", "restart_dead", "kmeans_init", "gumbel_temperature",
             "gumbel_temperature_end", "gumbel_anneal_steps", "gumbel_schedule", "gumbel_kl_weight"]
    names += ["fsq_levels", "rotation_trick", "cosine_codebook", "precision", "jit_compile", "sync_batchnorm"]
    strategy = strategy_for(args, "jit_compile")
    flags = {name: getattr(args, name) for name in names}
    if args.fsq_levels and args.num_codes is None and not args.resume:
        flags["num_codes"] = math.prod(args.fsq_levels)  # derived; given, it must agree (Config checks)
    if is_chief(strategy) or args.resume:
        config = config_for_run(args.run, flags, args.resume)
    else:  # another worker: the chief may have written the run's config.json already
        config = validate_flags(Config(**{k: v for k, v in flags.items() if v is not None}), flags)
    if strategy is not None:
        config.jit_compile = False
    check_options_apply(flags, config.quantizer)
    if config.quantizer == "fsq" and args.beta is not None:
        raise UsageError("--beta (the commitment weight) does not apply to --quantizer fsq: it has no commitment term")
    if args.eval_every is not None and args.eval_data is None:
        raise UsageError("--eval-every needs --eval-data DIR (the held-out images to score)")
    evaluation = {} if args.eval_every is None else {"eval_every": args.eval_every}
    train_vqvae(config, args.run, steps=args.steps, epochs=args.epochs, resume=args.resume,
                cache=args.cache or "auto", deterministic=True, tensorboard=args.tensorboard, eval_data=args.eval_data,
                strategy=strategy, **evaluation)
    print(f"VQ-VAE weights: {os.path.join(args.run, 'vqvae.weights.h5')}; grids in {os.path.join(args.run, 'samples')}")


def train_prior_command(args):
    from vq_vae_keras.training import train_prior
    from vq_vae_keras.run import RunDir, load_vqvae

    strategy = strategy_for(args, "prior_jit_compile")
    run = RunDir(args.run)
    config = run.require_config()
    existing = run.prior_files() if is_chief(strategy) else []  # another worker leaves the run's files alone
    if existing and not (args.resume or args.restart):
        raise UsageError(f"{args.run} already has a prior ({os.path.basename(existing[0])}, ...); add --resume to "
                         "continue it, or --restart to delete it and train a new one")
    if args.resume and not os.path.isfile(run.prior_checkpoint):
        raise UsageError(f"no prior checkpoint at {run.prior_checkpoint} to resume; train without --resume")
    flags = {"data": args.data, "prior_batch_size": args.batch_size, "prior_seed": args.seed}
    flags.update(val_split=args.val_split, sample_every_epochs=args.sample_every_epochs, prior_jit_compile=args.prior_jit_compile)
    flags.update(prior=args.prior, pixelcnn_width=args.pixelcnn_width, pixelcnn_depth=args.pixelcnn_depth,
                 pixelcnn_kernel=args.pixelcnn_kernel)
    if args.resume and args.classes and config.classes is None:
        raise UsageError("--classes contradicts the run's saved prior, which is not class-conditional "
                         "(--restart --classes trains a new one)")
    if not args.resume:
        config.classes = None  # a new prior: conditional only with --classes
    config = apply_flags(config, flags, changeable=("data", "sample_every_epochs") if args.resume else tuple(flags),
                         flag_names={"prior_batch_size": "--batch-size", "prior_seed": "--seed"})
    pixelcnn_flags = [name for name in flags if name.startswith("pixelcnn") and flags[name] is not None]
    if pixelcnn_flags and config.prior != "pixelcnn":
        raise UsageError(f"--{pixelcnn_flags[0].replace('_', '-')} applies to --prior pixelcnn, this prior is {config.prior}")
    if not args.resume and not (config.data and os.path.isdir(config.data)):  # --data itself was checked
        raise UsageError(f"the run's image folder {config.data} is gone; give --data DIR" if config.data else
                         "no image folder: give --data (the run's config.json names none)")
    if not os.path.isfile(run.vqvae_weights):
        raise UsageError(f"no trained VQ-VAE in {args.run}; run: python train.py vqvae --run {args.run} ...")
    if args.restart:
        from vq_vae_keras.data import ImageFolder

        load_vqvae(config, run)  # the VQ-VAE and the images (and classes) must load before the old prior goes
        images = ImageFolder(config.data, config.img_dim)
        if args.classes:
            images.class_labels()
        for path in existing:  # a half-done restart must not leave the old prior to --resume from
            os.remove(path)
    if strategy is not None:
        config.prior_jit_compile = False
    train_prior(config, args.run, steps=args.steps, epochs=args.epochs, resume=args.resume, deterministic=True,
                tensorboard=args.tensorboard, classes=args.classes, strategy=strategy)
    print(f"prior weights: {os.path.join(args.run, 'prior.weights.h5')}")


def demo():
    """Built-in shapes data set, 32 px preset, both stages, grids under runs/demo."""
    from vq_vae_keras.demo import run_demo

    run_demo(DEMO_RUN)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser().parse_args(argv)
    if args.command == "vqvae":
        train_vqvae_command(args)
    elif args.command == "prior":
        train_prior_command(args)


if __name__ == "__main__":
    run_main(main)
