"""Train a VQ-VAE and its prior (attention, or a gated PixelCNN) on a folder of images.

{demo}  # demo: built-in shapes, 32 px, both stages, into runs/demo
{vqvae}  # stage 1: the VQ-VAE
{prior}  # stage 2: the prior over its codes

Each flag's help gives its default; a flag left out on --resume keeps the run's saved value.
"""

import argparse
import math
import os
import sys

from ..cli import (DEFAULTS, ArgumentParser, add_field, add_steps_flags, apply_flags, check_flags_apply,
                   config_for_run, field_flags, flags_named, folder, fraction, given_fields, import_tensorflow,
                   nonnegative_float, nonnegative_int, not_a_file, output_file, positive_float, positive_int, console,
                   seed_int, unit_interval, validate_flags)
from ..config import PRIOR_LEVELS, Config
from ..errors import UsageError
from ..rundir import RunDir

DEMO_RUN = os.path.join("runs", "demo")
DISTRIBUTE = ("none", "mirrored", "multiworker")


def description(prog):
    command = f"python {prog}" if prog.endswith(".py") else prog
    lines = {"demo": command, "vqvae": f"{command} vqvae --data DIR --run RUN [...]",
             "prior": f"{command} prior --run RUN [...]"}
    width = max(map(len, lines.values()))
    return __doc__.format(**{k: "    " + v.ljust(width) for k, v in lines.items()})


def build_parser(prog="train.py"):
    parser = ArgumentParser(prog=prog, description=description(prog),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    vq = commands.add_parser("vqvae", help="train the VQ-VAE")
    vq.set_defaults(subparser=vq)
    add_field(vq, "data", "folder of images, searched recursively (needed for a new run; on --resume the run's "
                          "config.json names it: give it where the folder moved)", type=folder, metavar="DIR")
    vq.add_argument("--run", required=True, type=not_a_file, help="run directory (made if missing)")
    add_field(vq, "img_dim", "images are resized to img_dim x img_dim (a multiple of 4, at least 16)", type=int)
    add_field(vq, "z_dim", "channels of the encoder's output and of each code vector", type=positive_int)
    add_field(vq, "num_codes", "codes in the codebook", type=positive_int)
    add_field(vq, "batch_size", "images per training step (the global batch under --distribute)", type=positive_int)
    add_field(vq, "lr", "Adam learning rate", type=positive_float)
    add_schedule_flags(vq)
    add_field(vq, "beta", "weight of the commitment term", type=nonnegative_float)
    add_field(vq, "sample_every", "grids and checkpoint every N steps", type=positive_int, metavar="N")
    add_field(vq, "seed", "seed of weights, data order and dropout of the run", type=seed_int)
    health = vq.add_argument_group("codebook options (departures from the reference, off by default)")
    add_field(health, "quantizer", "vq: the reference; ema: codebook moved by exponential moving averages; "
                                   "gumbel: Gumbel-softmax relaxation (DALL-E's dVAE); fsq: finite scalar quantization")
    add_field(health, "fsq_levels", "fsq: values per channel, e.g. 4,4,4 (their product is the number of codes; "
                                    "--num-codes may be left out)", type=fsq_levels, metavar="L1,L2,...")
    add_field(health, "rotation_trick", "vq, ema: gradient to the encoder by the rotation trick instead of the "
                                        "straight-through copy", action="store_true")
    add_field(health, "cosine_codebook", "vq, ema: l2-normalise z and the code vectors (nearest code by cosine "
                                         "similarity)", action="store_true")
    ema, gumbel = ("quantizer", "ema"), ("quantizer", "gumbel")  # flags only these quantizers use
    add_field(health, "ema_decay", "ema: decay of the moving averages", type=unit_interval, only=ema)
    add_field(health, "restart_dead", "vq, ema: move a code unused for N steps to a random encoder output of the "
                                      "batch; 0: never", type=nonnegative_int, metavar="N")
    add_field(health, "kmeans_init", "vq, ema: initialise the codebook by k-means on the first batch's encoder "
                                     "outputs", action="store_true")
    add_field(health, "gumbel_temperature", "gumbel: start temperature", type=positive_float, only=gumbel)
    add_field(health, "gumbel_temperature_end", "gumbel: end temperature", type=positive_float, only=gumbel)
    add_field(health, "gumbel_anneal_steps", "gumbel: steps from start to end temperature", type=positive_int,
              only=gumbel)
    add_field(health, "gumbel_schedule", "gumbel: how the temperature goes from start to end", only=gumbel)
    add_field(health, "gumbel_kl_weight", "gumbel: weight of the KL divergence to uniform", type=nonnegative_float,
              only=gumbel)
    two = vq.add_argument_group("VQ-VAE-2 (a departure from the reference, off by default)")
    add_field(two, "levels", "1: the reference; 2: a top level of codes at img_dim/8 conditions the bottom "
                             "level at img_dim/4, and the decoder sees both (img_dim a multiple of 8)", type=int)
    add_field(two, "top_num_codes", "levels 2: codes in the top level's codebook", type=positive_int, metavar="K",
              default_text="--num-codes", only=("levels", 2))
    vq.add_argument("--cache", nargs="?", const="memory", type=cache_file, metavar="FILE.npz",
                    help="decode and resize the images once, keep them in memory (and in FILE.npz if given, "
                         "reused by later runs); same results (default: only folders whose decoded images "
                         "take at most 256 MiB are kept in memory)")
    add_steps_flags(vq)
    speed = vq.add_argument_group("speed (results within float noise of float32 without XLA)")
    add_field(speed, "precision", "float32 (the reference) or mixed precision; the quantizer stays float32")
    add_field(speed, "jit_compile", "compile the training step with XLA (--no-jit: off; always off under "
                                    "--distribute)", flag="--jit", action=argparse.BooleanOptionalAction)
    vq.add_argument("--tensorboard", action="store_true", help="write RUN/tensorboard/ (tensorboard --logdir RUN/tensorboard)")
    vq.add_argument("--eval-data", type=folder, metavar="DIR",
                    help="held-out images scored every --eval-every steps: psnr, ssim, codes_used in RUN/eval_log.csv")
    vq.add_argument("--eval-every", type=positive_int, metavar="N", help="steps between evaluations (default: 1000)")
    add_distribute_flags(vq)
    add_field(vq, "sync_batchnorm", "under --distribute: BatchNorm statistics of the global batch (N replicas "
                                    "compute what one device computes), not of each replica's slice",
              action="store_true")

    prior = commands.add_parser("prior", help="train the prior (attention or PixelCNN) on a trained VQ-VAE's codes")
    prior.set_defaults(subparser=prior)
    prior.add_argument("--run", required=True, type=folder, help="run directory of a trained VQ-VAE")
    add_field(prior, "prior_data", "folder of images whose codes the prior learns; recorded beside the VQ-VAE's",
              flag="--data", type=folder, metavar="DIR", default_text="the VQ-VAE's, from RUN/config.json")
    add_field(prior, "prior_batch_size", "code maps per training step (the global batch under --distribute)",
              flag="--batch-size", type=positive_int)
    add_field(prior, "prior_seed", "seed of the prior's weights and data order", flag="--seed", type=seed_int,
              default_text="the run's --seed")
    add_steps_flags(prior, restart=True)
    add_field(prior, "prior_lr", "Adam learning rate", flag="--lr", type=positive_float)
    add_schedule_flags(prior, prior=True)
    add_field(prior, "val_split", "hold out this fraction of the code maps for val_nll (0: train on all, as the "
                                  "reference)", type=nonnegative_float, metavar="F")
    add_field(prior, "sample_every_epochs", "grid of prior samples every N epochs (0: never)",
              type=nonnegative_int, metavar="N")
    add_field(prior, "prior_jit_compile", "compile the prior's training step with XLA (--no-jit: off; always off "
                                          "under --distribute)", flag="--jit", action=argparse.BooleanOptionalAction)
    prior.add_argument("--tensorboard", action="store_true", help="write RUN/tensorboard/prior/")
    size = prior.add_argument_group("attention prior's size (the demo halves the heads)")
    add_field(size, "prior_heads", "attention heads", type=positive_int)
    add_field(size, "prior_head_dim", "width of each head", type=positive_int)
    add_field(size, "prior_depth", "attention blocks", type=positive_int)
    kinds = prior.add_argument_group("prior kind and classes (departures from the reference, off by default)")
    add_field(kinds, "prior", "attention: the reference's PixelAtt; pixelcnn: a gated PixelCNN")
    add_field(kinds, "pixelcnn_width", "pixelcnn: channels of both stacks", type=positive_int, metavar="C",
              only=("prior", "pixelcnn"))
    add_field(kinds, "pixelcnn_depth", "pixelcnn: gated layers", type=positive_int, metavar="L",
              only=("prior", "pixelcnn"))
    add_field(kinds, "pixelcnn_kernel", "pixelcnn: odd kernel size >= 3", type=positive_int, metavar="K",
              only=("prior", "pixelcnn"))
    kinds.add_argument("--classes", action="store_true",
                       help="class-conditional prior: each image's class is its first-level subfolder of the images")
    prior.add_argument("--level", choices=PRIOR_LEVELS,
                       help="a two-level run's prior to train: top, or bottom (after the top one; it takes the top "
                            "prior's flags) (default: both, top first)")
    add_distribute_flags(prior)
    return parser


def add_schedule_flags(parser, prior=False):
    """--lr-schedule, --warmup-steps, --lr-min-ratio: the fields of a stage (prior: the prior's)."""
    field = lambda name: Config.stage_field(name, prior)  # noqa: E731
    group = parser.add_argument_group("learning-rate schedule (a departure from the reference, off by default)")
    add_field(group, field("lr_schedule"), "constant: --lr throughout (the reference); cosine: from --lr down to "
                                          "--lr x --lr-min-ratio, reached as the run ends", flag="--lr-schedule")
    add_field(group, field("warmup_steps"), "linear warm-up from 0 to --lr over the first N steps, with "
                                           "either schedule", flag="--warmup-steps", type=nonnegative_int,
              metavar="N")
    add_field(group, field("lr_min_ratio"), "cosine: the rate the run ends at, as a fraction of --lr",
              flag="--lr-min-ratio", type=fraction, metavar="R", only=(field("lr_schedule"), "cosine"))


def add_distribute_flags(parser):
    group = parser.add_argument_group("several devices (README: Scaling)")
    group.add_argument("--distribute", choices=DISTRIBUTE, default="none",
                       help="none: one device; mirrored: every local GPU (or --cpu-replicas); multiworker: one "
                            "process per machine, cluster from TF_CONFIG. --batch-size is the global batch "
                            "(default: %(default)s)")
    group.add_argument("--cpu-replicas", type=positive_int, metavar="N",
                       help="with --distribute mirrored: split the CPU into N devices (to try it out)")


def check_distribute_flags(args):
    """The flags that only mean something under a strategy (checked before TensorFlow is imported)."""
    if args.distribute == "none":
        if args.cpu_replicas is not None:
            raise UsageError("--cpu-replicas applies to --distribute mirrored")
        if getattr(args, "sync_batchnorm", None):
            raise UsageError("--sync-batchnorm applies to --distribute mirrored|multiworker (one device sees its whole batch)")


def start_tensorflow(args):
    """Import TensorFlow (quietly) and return the tf.distribute strategy the flags ask for (None:
    one device). XLA under a strategy follows the library's rule: it trains without it."""
    import_tensorflow()
    if args.distribute == "none":
        return None
    from ..distribute import make_strategy

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


def message_names(parser):
    """Field -> flag for messages. A --jit/--no-jit pair is named by its field (--jit-compile
    True/False), which says which value contradicts."""
    return {field: flag for field, flag in field_flags(parser).items() if flag != "--jit"}


def train_vqvae_command(args):
    parser = args.subparser
    if args.data is None and not args.resume:
        parser.error("the following arguments are required: --data (or --resume: the run records it)")
    flags = given_fields(args, parser)
    names = message_names(parser)
    if args.fsq_levels and args.num_codes is None and not args.resume:
        flags["num_codes"] = math.prod(args.fsq_levels)  # derived; given, it must agree (Config checks)
    check_distribute_flags(args)
    if args.eval_every is not None and args.eval_data is None:
        raise UsageError("--eval-every needs --eval-data DIR (the held-out images to score)")
    if args.distribute == "multiworker":  # whether this process writes the run is known once the cluster is
        strategy = start_tensorflow(args)
        from ..distribute import is_chief

        chief = is_chief(strategy)
    else:  # one process writes the run: its flags are checked before TensorFlow is imported
        strategy, chief = None, True
    if chief or args.resume:
        config = config_for_run(args.run, flags, args.resume, names)
    else:  # another worker: the chief may have written the run's config.json already
        config = validate_flags(Config(**{k: v for k, v in flags.items() if v is not None}), flags, names)
    check_flags_apply(args, parser, config)
    if args.beta is not None and not config.takes("beta"):
        raise UsageError(f"--beta (the commitment weight) does not apply to --quantizer {config.quantizer}: "
                         "it has no commitment term")
    if args.data is None and not (config.data and os.path.isdir(config.data)):
        raise UsageError(f"--resume: the run's image folder {config.data} is gone; give --data DIR (where it moved)"
                         if config.data else "--resume: the run's config.json names no image folder; give --data DIR")
    if args.distribute != "multiworker":
        strategy = start_tensorflow(args)
    from ..training import train_vqvae

    evaluation = {} if args.eval_every is None else {"eval_every": args.eval_every}
    with flags_named(flags, names):  # what is checked against the run's length: --warmup-steps
        train_vqvae(config, args.run, steps=args.steps, epochs=args.epochs, resume=args.resume,
                    cache=args.cache or "auto", deterministic=True, tensorboard=args.tensorboard,
                    eval_data=args.eval_data, strategy=strategy, **evaluation)
    print(f"VQ-VAE weights: {os.path.join(args.run, 'vqvae.weights.h5')}; grids in {os.path.join(args.run, 'samples')}")


def restart_defaults(config, flags):
    """--restart trains a new prior: each prior field whose flag was not given returns to its
    default (nothing of the deleted prior carries over unseen). Returns what changed, as text."""
    changed = []
    for field, value in flags.items():
        if value is None and getattr(config, field) != DEFAULTS[field]:
            changed.append(f"{field} {getattr(config, field)} -> {DEFAULTS[field]}")
            setattr(config, field, DEFAULTS[field])
    return changed


def train_prior_command(args):
    parser = args.subparser
    check_distribute_flags(args)
    flags = given_fields(args, parser)
    names = message_names(parser)
    config = Config.load(os.path.join(args.run, "config.json"))
    run = RunDir(args.run)
    level = args.level
    if level is not None:
        config.check_level(level)
    if level == "bottom" and args.classes:
        raise UsageError("--classes applies to the top prior: the bottom one is conditioned on the top codes")
    if args.resume and args.classes and config.classes is None:
        raise UsageError("--classes contradicts the run's saved prior, which is not class-conditional "
                         "(--restart --classes trains a new one)")
    # A resumed prior keeps its flags. A two-level run's priors share theirs: the bottom one keeps
    # the top one's, and so does a top one trained again (--restart, or beside a bottom one).
    bottom_trained = config.levels == 2 and os.path.isfile(run.at_level("bottom").prior_weights)
    kept = args.resume or level == "bottom" or (level == "top" and (bottom_trained or args.restart))
    reset = restart_defaults(config, flags) if args.restart and not kept else []
    if not kept:
        config.classes = None  # a new prior: conditional only with --classes
    elif flags.get("prior_data") is not None:  # the saved codes are what the prior goes on learning
        if os.path.abspath(flags["prior_data"]) != os.path.abspath(config.prior_data or config.data or ""):
            what = "a resumed prior goes on with" if args.resume else "a two-level run's priors learn"
            raise UsageError(f"--data {flags['prior_data']}: {what} the codes of {config.prior_data or config.data} "
                             f"(RUN/{os.path.basename(run.at_level(level).codes)}); --restart"
                             f"{' without --level' if level else ''} trains one on another folder")
        flags["prior_data"] = None
    changeable = ("sample_every_epochs", "prior_jit_compile") if kept else tuple(flags)
    config = apply_flags(config, flags, changeable=changeable, flag_names=names)
    check_flags_apply(args, parser, config)
    images = config.prior_data or config.data
    needs_images = not args.resume and level != "bottom"  # the bottom prior learns the codes the top's stage wrote
    if needs_images and not (images and os.path.isdir(images)):  # --data itself was checked
        raise UsageError(f"the run's image folder {images} is gone; give --data DIR" if images else
                         "no image folder: give --data (the run's config.json names none)")
    strategy = start_tensorflow(args)
    from ..distribute import is_chief
    from ..run import load_vqvae
    from ..training import train_prior

    views = [run.at_level(each) for each in ((level,) if level else PRIOR_LEVELS)] if config.levels == 2 else [run]
    existing = [path for view in views for path in view.prior_files()] if is_chief(strategy) else []  # another worker leaves the run's files alone
    if existing and not (args.resume or args.restart):
        raise UsageError(f"{args.run} already has a prior ({os.path.basename(existing[0])}, ...); add --resume to "
                         "continue it, or --restart to delete it and train a new one")
    if args.resume and not os.path.isfile(views[0].prior_checkpoint):
        raise UsageError(f"no prior checkpoint at {views[0].prior_checkpoint} to resume; train without --resume")
    if not os.path.isfile(run.vqvae_weights):
        raise UsageError(f"no trained VQ-VAE in {args.run}; run: python train.py vqvae --run {args.run} ...")
    if args.restart:
        from ..data import ImageFolder

        load_vqvae(config, run)  # the VQ-VAE and the images (and classes) must load before the old prior goes
        if needs_images:
            folder = ImageFolder(images, config.img_dim)
            if args.classes:
                folder.class_labels()
        for path in existing:  # a half-done restart must not leave the old prior to --resume from
            os.remove(path)
        if reset:
            print(f"--restart: a new prior; flags not given take their defaults: {', '.join(reset)}")
    with flags_named(flags, names):
        train_prior(config, args.run, steps=args.steps, epochs=args.epochs, resume=args.resume, deterministic=True,
                    tensorboard=args.tensorboard, classes=args.classes, strategy=strategy, level=level)
    print(f"prior weights: {', '.join(view.prior_weights for view in views)}")


def demo():
    """Built-in shapes data set, 32 px preset, both stages, grids under runs/demo."""
    import_tensorflow()
    from ..demo import run_demo

    run_demo(DEMO_RUN)


def main(argv=None, prog="train.py"):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser(prog).parse_args(argv)
    if args.command == "vqvae":
        train_vqvae_command(args)
    elif args.command == "prior":
        train_prior_command(args)


def run():
    """The console script (vqk-train), `python -m vq_vae_keras.commands.train` and train.py."""
    console(main)


if __name__ == "__main__":
    run()
