"""What train.py and sample.py share: argument types, one-line errors, exit statuses."""

import argparse
import os
import sys

from .errors import UsageError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind, low, inclusive, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = _number(int, 1, True, ">= 1")
nonnegative_int = _number(int, 0, True, ">= 0")
positive_float = _number(float, 0.0, False, "> 0")
nonnegative_float = _number(float, 0.0, True, ">= 0")


def add_steps_flags(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=positive_int, help="train until this global step")
    group.add_argument("--epochs", type=positive_int, help="train this many epochs (default: the reference's 1000)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")


def config_for_run(run, flags, resume):
    """The Config of a VQ-VAE run: new from flags, or on --resume the saved one, which the flags
    may not contradict (a moved --data folder and --sample-every may change)."""
    from .config import Config

    config_path = os.path.join(run, "config.json")
    if not resume:
        if os.path.exists(config_path):
            raise UsageError(f"{run} already holds a run; add --resume to continue it, or choose another --run")
        return Config(**{k: v for k, v in flags.items() if v is not None}).validate()
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
            flag = (flag_names or {}).get(name, f"--{name.replace('_', '-')}")
            raise UsageError(f"{flag} {value} contradicts the run's saved {name} = {saved}")
    return config.validate()


def check_options_apply(flags, quantizer):
    """A quantizer-specific flag given with another quantizer is a mistake worth an error."""
    for name, value in flags.items():
        family = name.split("_")[0]
        if value is not None and family in ("ema", "gumbel") and family != quantizer:
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
