"""README.md's code blocks run as written, so a snippet that stops working fails here.

Each block runs in a fresh process, in order, in one folder holding `my_images/` (a few small
pictures), so later blocks find the run directories earlier ones made. The only changes are the
budget: fewer steps and epochs, and FID on two samples with random Inception weights (no download).
Not run: `pip install` lines (what .ci/run and tests/test_packaging.py do), the test command
itself, the demo (`python train.py` alone: tests/test_demo.py), and lines for a Keras backend
that is not installed (KERAS_BACKEND=jax or torch: tests/test_backends.py runs the commands
under each in CI).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, write_images

SMALLER = [  # (pattern, replacement): the budget, nothing else
    (r"\bsteps=\d+", "steps=2"), (r"\bepochs=\d+", "epochs=1"),
    (r"--steps \d+", "--steps 2"), (r"--epochs \d+", "--epochs 1"),
    (r"--fid \d+", "--fid 2 --inception-weights none"),
]
NOT_RUN = ("pip ", "python -m pytest")


def readme_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)


def smaller(code):
    for pattern, replacement in SMALLER:
        code = re.sub(pattern, replacement, code)
    return code


def backends(block):
    """The Keras backends the block's lines name (KERAS_BACKEND=jax python ...)."""
    return set(re.findall(r"^KERAS_BACKEND=(\w+) ", block, flags=re.M))


def backend_missing(line, block):
    """Whether the line is one of a block that needs a Keras backend whose package this Python
    lacks (the README's test command installs neither jax nor torch; CI's backend stage does)."""
    missing = [name for name in backends(block) if importlib.util.find_spec(name) is None]
    return bool(missing) and line.strip().startswith("KERAS_BACKEND=")


def script(block):
    """A bash block as a script: comments and lines not run dropped, the budget made smaller, the
    commands pointed at this checkout, stopping at the first failure."""
    lines = [line for line in block.splitlines() if not line.strip().startswith(NOT_RUN + ("#",))
             and line.split("  #")[0].strip() != "python train.py" and not backend_missing(line, block)]
    text = smaller("\n".join(lines))
    for command in ("train.py", "sample.py"):
        text = text.replace(f"python {command}", f"{sys.executable} {os.path.join(ROOT, command)}")
    return "set -e\n" + text + "\n"


def test_readme_has_python_and_command_blocks():
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 3
    assert set(kinds) <= {"python", "bash"}  # a block of another kind would be left untested


def test_every_pip_line_is_one_the_tests_cover():
    pips = [line for kind, block in readme_blocks() if kind == "bash" for line in block.splitlines()
            if line.startswith("pip ")]
    assert pips and all(line.split("#")[0].split("&&")[0].strip() in
                        ("pip install -r requirements.txt", "pip install .", "pip install -r requirements-backends.txt")
                        for line in pips)


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path):
    write_images(tmp_path / "my_images", count=40, size=40)  # the grids show 32
    env = {**os.environ, "PYTHONPATH": ROOT}
    for number, (kind, block) in enumerate(readme_blocks()):
        argv = [sys.executable, "-c", smaller(block)] if kind == "python" else ["bash", "-c", script(block)]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"README block {number} ({kind}) failed:\n{argv[-1]}\n{done.stderr[-3000:]}"
        ran = "\n".join(line for line in block.splitlines() if not backend_missing(line, block))
        for run in re.findall(r"--run (\S+)", ran):  # each run a block names was made (background jobs too)
            assert os.path.isfile(tmp_path / run / "config.json"), f"README block {number}: no {run}"
