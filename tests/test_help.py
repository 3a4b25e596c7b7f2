"""The commands' help and usage errors: every flag explained with its default, answered without
TensorFlow, no abbreviations, a close match suggested for a typo."""

import argparse
import subprocess
import sys

import pytest

from conftest import ROOT, call_main
from vq_vae_keras import cli
from vq_vae_keras.commands import sample as sample_command
from vq_vae_keras.commands import train as train_command

COMMANDS = {"train.py": train_command, "sample.py": sample_command}


def parsers():
    """(name, parser) of both commands and every sub-command."""
    for script, module in COMMANDS.items():
        parser = module.build_parser()
        yield script, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    yield f"{script} {command}", sub


def flags_of(parser):
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


def is_switch(action):
    """A flag without a value (--resume): its default is its absence."""
    return action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)


def test_every_flag_has_help_that_shows_its_default():
    for name, parser in parsers():
        for action in flags_of(parser):
            flag = f"{name} {action.option_strings[0]}"
            assert action.help and "\n" not in action.help, f"{flag}: no help"
            text = action.help % vars(action)  # as argparse formats it
            field = getattr(action, "config_field", None)
            if field is not None:  # made from the Config: its default is the field's default
                default = cli.DEFAULTS[field]
                if default is not None and not is_switch(action):
                    assert f"(default: {cli.show(default)})" in text, f"{flag}: {text!r}"
                if field in cli.CHOICES:
                    assert tuple(action.choices) == tuple(cli.CHOICES[field]), flag
            elif action.default not in (None, False) and not is_switch(action):
                assert f"(default: {action.default})" in text, f"{flag}: {text!r}"
            if field is None and action.default is None and not action.required and not is_switch(action):
                # no value of its own: the help says what happens without it, or what it adds
                assert "default" in text or action.type is not None or action.nargs is not None, flag


def test_config_flags_keep_their_default_out_of_the_namespace():
    """A flag not given is None, so --resume can tell it from one given with the default value."""
    args = train_command.build_parser().parse_args(["vqvae", "--data", ROOT, "--run", "r"])
    assert args.img_dim is None and args.jit_compile is None and args.quantizer is None


def test_every_parser_refuses_abbreviations():
    for name, parser in parsers():
        assert parser.allow_abbrev is False, name


@pytest.mark.parametrize("argv, message", [
    (["vqvae", "--data", ROOT, "--run", "r", "--stpes", "3"],
     "unrecognized arguments: --stpes 3 (did you mean --steps?)"),
    (["vqvae", "--data", ROOT, "--run", "r", "--step", "3"], "(did you mean --steps?)"),
    (["vqvae", "--data", ROOT, "--run", "r", "--num-code", "8"], "(did you mean --num-codes?)"),
    (["prior", "--run", ROOT, "--prior-head", "4"], "(did you mean --prior-heads?)"),
    (["vqvae", "--data", ROOT, "--run", "r", "--quantizer", "emma"], "invalid choice: 'emma'"),
    (["vqvae", "--data", ROOT, "--run", "r", "--xyzzy"], "unrecognized arguments: --xyzzy"),
    (["vqvea"], "did you mean vqvae?"),
])
def test_a_typo_or_an_abbreviation_is_one_line_with_the_close_match(argv, message):
    status, _, err = call_main(train_command.main, argv)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_sample_flags_typo():
    status, _, err = call_main(sample_command.main, ["random", "--run", ROOT, "--temprature", "0.5"])
    assert status == 2 and "did you mean --temperature?" in err, err


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from vq_vae_keras.cli import run_main
from vq_vae_keras.commands import {module} as command
try:
    run_main(command.main, {argv!r})
except SystemExit as e:
    print("exit", e.code)
print("tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("module, argv, status", [
    ("train", ["--help"], 0), ("train", ["vqvae", "--help"], 0), ("train", ["prior", "--help"], 0),
    ("train", ["vqvae", "--data", ROOT, "--run", "r", "--stpes", "3"], 2),
    ("train", ["vqvae", "--data", ROOT, "--run", "r", "--img-dim", "15"], 2),
    ("sample", ["--help"], 0), ("sample", ["random", "--help"], 0), ("sample", ["evaluate", "--help"], 0),
    ("sample", ["recon", "--run", ROOT, "--data", ROOT, "--n", "3"], 2),
    ("sample", ["random", "--run", "/no/such/run"], 2),
])
def test_help_and_usage_errors_do_not_import_tensorflow(module, argv, status):
    code = SCRIPT.format(root=ROOT, module=module, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = result.stdout.strip().splitlines()
    assert lines[-2:] == [f"exit {status}", "False"], result.stdout[-2000:] + result.stderr[-2000:]


def test_json_in_a_file_that_is_not_a_folder_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a file\n")
    for path in (tmp_path / "notes.txt" / "eval.json", tmp_path / "notes.txt" / "deeper" / "eval.json"):
        status, _, err = call_main(sample_command.main, ["evaluate", "--run", str(tmp_path), "--data", str(tmp_path),
                                                         "--json", str(path)])
        assert status == 2 and len(err.strip().splitlines()) == 1 and "is a file, not a folder" in err, err


def test_write_failed_is_one_line_and_exit_1():
    def main(argv):
        raise cli.WriteFailed("cannot write RUN/vqvae.weights.h5: disk full; the run resumes from step 100")

    status, _, err = call_main(main, [])
    assert status == 1 and err == "error: cannot write RUN/vqvae.weights.h5: disk full; the run resumes from step 100\n"


def test_a_config_error_names_the_flag_of_its_field():
    class Picky(cli.Config):
        def validate(self):
            raise cli.UsageError("the codebook is too small for this image size", field="num_codes")

    with pytest.raises(cli.UsageError, match="^--num-codes: the codebook is too small"):
        cli.validate_flags(Picky(), {"num_codes": 2})
    with pytest.raises(cli.UsageError, match="^the codebook is too small"):  # set by no flag: as it is
        cli.validate_flags(Picky(), {"num_codes": None})
