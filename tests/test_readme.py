"""README.md's code blocks run as written, so a snippet that stops working fails here.

Each block runs in a fresh process, in order, in one folder holding `my_images/` (a few small
pictures), so later blocks find the run directories earlier ones made. The only changes are the
budget: fewer steps and epochs, and FID on two samples with random Inception weights (no download).
Not run: `pip install` lines (what .ci/run and tests/test_packaging.py do), the test command
itself, and the demo (`python train.py` alone: tests/test_demo.py).
"""

import os
import re
import shlex
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


def commands(block):
    """The command lines of a bash block, comments dropped, lines that are not run left out."""
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#") and not line.startswith(NOT_RUN) and line != "python train.py":
            yield line


def test_readme_has_python_and_command_blocks():
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 3
    assert set(kinds) <= {"python", "bash"}  # a block of another kind would be left untested


def test_every_pip_line_is_one_the_tests_cover():
    pips = [line for kind, block in readme_blocks() if kind == "bash" for line in block.splitlines()
            if line.startswith("pip ")]
    assert pips and all(line.split("#")[0].split("&&")[0].strip() in ("pip install -r requirements.txt", "pip install .")
                        for line in pips)


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path):
    write_images(tmp_path / "my_images", count=40, size=40)  # the grids show 32
    env = {**os.environ, "PYTHONPATH": ROOT}
    for number, (kind, block) in enumerate(readme_blocks()):
        if kind == "python":
            runs = [[sys.executable, "-c", smaller(block)]]
        else:
            runs = []
            for line in commands(block):
                words = shlex.split(smaller(line))
                assert words[0] == "python" and words[1] in ("train.py", "sample.py"), line
                runs.append([sys.executable, os.path.join(ROOT, words[1]), *words[2:]])
        for argv in runs:
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"README block {number} ({kind}) failed:\n{argv}\n{done.stderr[-3000:]}"
