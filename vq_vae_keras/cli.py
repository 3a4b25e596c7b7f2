"""What the commands share: flags made from the Config, argument types, one-line errors, exit statuses.

Nothing here imports TensorFlow: `--help` and bad flags are answered in well under a second, and
TensorFlow is imported only once the arguments have been parsed and checked.
"""

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import sys

from . import config as config_module
from .config import Config
from .errors import UsageError, WriteFailed

EXIT_USAGE = 2
EXIT_FAILED = 1

# The help shows these, so a default is written once: in the Config.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
CHOICES = {"quantizer": config_module.QUANTIZERS, "gumbel_schedule": config_module.SCHEDULES,
           "precision": config_module.PRECISIONS, "prior": config_module.PRIORS,
           "lr_schedule": config_module.LR_SCHEDULES, "prior_lr_schedule": config_module.LR_SCHEDULES,
           "levels": config_module.LEVELS}


def quiet_tensorflow_logs():
    """A command's own process: TensorFlow's C++ log lines (an "E0000 ... cuInit" line on every
    machine without a GPU, XLA notices) stay hidden unless TF_CPP_MIN_LOG_LEVEL or VQK_VERBOSE_TF
    asks otherwise. Set before TensorFlow is imported, which is when it reads it."""
    if not os.environ.get("VQK_VERBOSE_TF"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow():
    """Import TensorFlow now, its start-up notices hidden: a command calls this once its
    arguments are checked, before it imports the modules that need TensorFlow."""
    from . import _import_tensorflow_quietly

    _import_tensorflow_quietly()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2, abbreviations are not
    accepted (`--step` must not silently mean `--steps`), and a typo gets the close match."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(namespace, extras)}")
        return namespace

    def _suggestion(self, namespace, extras):
        """' (did you mean --steps?)' for the first unknown flag close to one of the command's."""
        parser = self
        for action in self._actions:  # the chosen sub-command knows the flags that were meant
            if isinstance(action, argparse._SubParsersAction) and getattr(namespace, action.dest, None):
                parser = action.choices.get(getattr(namespace, action.dest), self)
        known = [flag for action in parser._actions for flag in action.option_strings]
        for word in extras:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}){hint}")


def show(value):
    """A default as the help writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_field(parser, field, help, flag=None, default_text=None, only=None, **kwargs):
    """A flag that sets the Config field `field`: its help shows the Config's default (or
    default_text, for a default that is not a plain value), its choices are the config module's.
    only=(other field, value): the flag means something only where that field has that value
    (--ema-decay: only=("quantizer", "ema")); given elsewhere it is an error (check_flags_apply).

    argparse's own default stays None, so a flag that was not given is told apart from one given
    with the default value (--resume compares only what was given with the saved run)."""
    flag = flag or "--" + field.replace("_", "-")
    default = DEFAULTS[field]
    if default_text is None and default is not None and kwargs.get("action") != "store_true":
        default_text = show(default)
    if default_text is not None:
        help = f"{help} (default: {default_text})"
    if field in CHOICES:
        kwargs["choices"] = CHOICES[field]
    elif "action" not in kwargs:  # named by its flag, as argparse would: --batch-size BATCH_SIZE
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    kwargs.setdefault("default", None)
    action = parser.add_argument(flag, dest=field, help=help, **kwargs)
    action.config_field, action.only = field, only
    return action


def field_flags(parser):
    """{Config field: its flag} of every add_field flag of a parser (argument groups included)."""
    return {action.config_field: action.option_strings[0] for action in parser._actions
            if hasattr(action, "config_field")}


def given_fields(args, parser):
    """{Config field: the flag's value or None} of every add_field flag of a parser."""
    return {field: getattr(args, field) for field in field_flags(parser)}


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
fraction = _number(float, "in [0, 1)", 0.0, 1.0, open_high=True)


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
    """An argparse type: a file to write, named *ending, in a folder that exists or can be made
    (caught here rather than after minutes of work: a file where its folder should be)."""
    def parse(text):
        if os.path.isdir(text) or text.endswith(os.sep):
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in {ending}")
        if not text.lower().endswith(ending):
            raise argparse.ArgumentTypeError(f"{text} must end in {ending}")
        parent = os.path.dirname(os.path.abspath(text))
        while not os.path.exists(parent):  # the nearest existing folder above: it will hold the new ones
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is a file, not a folder")
        return text
    return parse


def _flag(name, flag_names=None):
    return (flag_names or {}).get(name, f"--{name.replace('_', '-')}")


@contextlib.contextmanager
def flags_named(flags, flag_names=None):
    """A UsageError about a field set by a flag names that flag."""
    try:
        yield
    except UsageError as e:
        field = e.field or str(e).split(" ")[0]  # older messages start with the field's name
        if flags.get(field) is not None:
            raise UsageError(f"{_flag(field, flag_names)}: {e}", field=field) from None
        raise


def validate_flags(config, flags, flag_names=None):
    """config.validate(), a complaint about a field set by a flag naming that flag."""
    with flags_named(flags, flag_names):
        return config.validate()


def add_steps_flags(parser, restart=False):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=count, help="train until this global step")
    group.add_argument("--epochs", type=count, help="train this many epochs (default: the reference's 1000)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    if restart:
        group.add_argument("--restart", action="store_true",
                           help="delete the run's prior (weights, checkpoint, codes.npy, log, sample grids) "
                                "and train a new one: prior flags not given take their defaults (a two-level "
                                "run: both priors; with --level, that one alone, keeping the flags)")


def config_for_run(run, flags, resume, flag_names=None):
    """The Config of a VQ-VAE run: new from flags, or on --resume the saved one, which the flags
    may not contradict (a moved --data folder, --sample-every and --jit/--no-jit, which changes speed
    alone, may change)."""
    from .rundir import RunDir

    config_path = os.path.join(run, "config.json")
    if not resume:
        if RunDir(run).holds_vqvae():
            raise UsageError(f"{run} already holds a run; add --resume to continue it, or choose another --run")
        return validate_flags(Config(**{k: v for k, v in flags.items() if v is not None}), flags, flag_names)
    if not os.path.isfile(config_path):
        raise UsageError(f"--resume: no run to resume at {run} (no config.json)")
    if not RunDir(run).holds_vqvae():
        raise UsageError(f"--resume: {run} stopped before its first checkpoint; train it anew: the same command "
                         "without --resume")
    return apply_flags(Config.load(config_path), flags, changeable=("data", "sample_every", "jit_compile"), flag_names=flag_names)


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
            raise UsageError(f"{_flag(name, flag_names)} {value} contradicts the run's saved {name} = {saved}",
                             field=name)
    return validate_flags(config, flags, flag_names)


def check_flags_apply(args, parser, config):
    """A flag given for another quantizer (or prior kind) than the run's is a mistake worth an error."""
    for action in parser._actions:
        only = getattr(action, "only", None)
        if only and getattr(args, action.dest) is not None:
            field, value = only
            if getattr(config, field) != value:
                flag = field_flags(parser).get(field) or _flag(field)  # the prior's --lr-schedule: prior_lr_schedule
                raise UsageError(f"{action.option_strings[0]} applies to {flag} {value}, "
                                 f"this run uses {getattr(config, field)}", field=action.dest)


def _non_finite_loss(error):
    """Whether error is the training loop's NonFiniteLoss (looked up only where its module was
    imported: where it was not, nothing raised it, and importing it would import TensorFlow)."""
    modules = [sys.modules.get(f"{__package__}.{name}") for name in ("callbacks", "training")]
    kinds = [getattr(module, "NonFiniteLoss", None) for module in modules]
    return any(kind is not None and isinstance(error, kind) for kind in kinds)


def console(main):
    """A command's process (its console script, `python -m`, or the repository's script): quiet
    TensorFlow, then main(argv, prog) under run_main, named as it was called."""
    quiet_tensorflow_logs()
    run_main(lambda argv: main(argv, prog=os.path.basename(sys.argv[0])))


def run_main(main, argv=None):
    """Run main(argv), turning known failures into a one-line message and an exit status."""
    try:
        main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoint saved; run the same command with --resume to continue", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not _non_finite_loss(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
