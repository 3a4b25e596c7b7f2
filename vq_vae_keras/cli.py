"""What train.py and sample.py share: argument types, one-line errors, exit statuses."""

import argparse
import math
import os
import sys

from .errors import UsageError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind, what, low, high=None, open_low=False, open_high=False):
    """An argparse type: a finite number of `kind` in [low, high] (an end excluded if open_*)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = value < low or (open_low and value == low)
        too_high = high is not None and (value > high or (open_high and value == high))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


INT32_MAX = 2 ** 31 - 1
positive_int = _number(int, ">= 1", 1)
count = _number(int, f"in [1, {INT32_MAX}]", 1, INT32_MAX)  # steps, epochs: anything larger is a typo
grid_size = _number(int, "in [1, 64]", 1, 64)  # n of an n x n picture grid
nonnegative_int = _number(int, ">= 0", 0)
seed_int = _number(int, f"in [0, {INT32_MAX}]", 0, INT32_MAX)
positive_float = _number(float, "> 0", 0.0, open_low=True)
nonnegative_float = _number(float, ">= 0", 0.0)
unit_interval = _number(float, "in (0, 1)", 0.0, 1.0, open_low=True, open_high=True)
probability = _number(float, "in (0, 1]", 0.0, 1.0, open_low=True)


def folder(text):
    """An argparse type: an existing folder."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{'not a folder' if os.path.exists(text) else 'no such folder'}: {text}")
    return text


def not_a_file(text):
    """An argparse type: a folder to create or to use (a run directory), not a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def output_file(ending):
    """An argparse type: a file to write, named *ending (its folder is made if missing)."""
    def parse(text):
        if os.path.isdir(text) or text.endswith(os.sep):
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in {ending}")
        if not text.lower().endswith(ending):
            raise argparse.ArgumentTypeError(f"{text} must end in {ending}")
        return text
    return parse


def _flag(name, flag_names=None):
    return (flag_names or {}).get(name, f"--{name.replace('_', '-')}")


def validate_flags(config, flags, flag_names=None):
    """config.validate(), a complaint about a field set by a flag naming that flag."""
    try:
        return config.validate()
    except UsageError as e:
        field = str(e).split(" ")[0]
        if flags.get(field) is not None:
            raise UsageError(f"{_flag(field, flag_names)}: {e}") from None
        raise


def add_steps_flags(parser, restart=False):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=count, help="train until this global step")
    group.add_argument("--epochs", type=count, help="train this many epochs (default: the reference's 1000)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    if restart:
        group.add_argument("--restart", action="store_true",
                           help="delete the run's prior (weights, checkpoint, codes.npy, log, sample grids) "
                                "and train it anew")


def config_for_run(run, flags, resume):
    """The Config of a VQ-VAE run: new from flags, or on --resume the saved one, which the flags
    may not contradict (a moved --data folder and --sample-every may change)."""
    from .config import Config

    config_path = os.path.join(run, "config.json")
    if not resume:
        if os.path.exists(config_path):
            raise UsageError(f"{run} already holds a run; add --resume to continue it, or choose another --run")
        return validate_flags(Config(**{k: v for k, v in flags.items() if v is not None}), flags)
    if not os.path.isfile(config_path):
        raise UsageError(f"--resume: no run to resume at {run} (no config.json)")
    return apply_flags(Config.load(config_path), flags, changeable=("data", "sample_every"))


def apply_flags(config, flags, changeable, flag_names=None):
    """Set the given (non-None) flags on config; one outside `changeable` that differs from the
    saved value is a UsageError. flag_names maps a field to its flag where they differ."""
    for name, value in flags.items():
        if value is None:
            continue
        saved = getattr(config, name)
        if name in changeable:
            setattr(config, name, value)
        elif value != saved:
            raise UsageError(f"{_flag(name, flag_names)} {value} contradicts the run's saved {name} = {saved}")
    return validate_flags(config, flags, flag_names)


def check_options_apply(flags, quantizer):
    """A quantizer-specific flag given with another quantizer is a mistake worth an error."""
    for name, value in flags.items():
        family = name.split("_")[0]
        if value is not None and family in ("ema", "gumbel", "fsq") and family != quantizer:
            raise UsageError(f"--{name.replace('_', '-')} applies to --quantizer {family}, this run uses {quantizer}")


def run_main(main, argv=None):
    """Run main(argv), turning known failures into a one-line message and an exit status."""
    from .training import NonFiniteLoss

    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoint saved; run the same command with --resume to continue", file=sys.stderr)
        sys.exit(130)
