"""The package installs and imports: metadata that agrees with requirements.txt, a fresh venv that runs it
from another folder without the repository, an import that leaves TensorFlow and TF_CPP_MIN_LOG_LEVEL alone."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


def requirements(lines):
    """{name: specifier} of requirement lines, comments and blanks left out."""
    found = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
            found[name.lower()] = ",".join(sorted(spec.replace(" ", "").split(",")))
    return found


@pytest.mark.skipif(tomllib is None, reason="tomllib: Python 3.11 or later")
def test_pyproject_and_requirements_txt_agree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        wanted = requirements(f)
    extras = project["optional-dependencies"]
    declared = requirements(project["dependencies"] + extras["test"])
    assert declared == wanted
    with open(os.path.join(ROOT, "requirements-backends.txt")) as f:
        assert requirements(extras["jax"] + extras["torch"]) == requirements(f)  # the other Keras backends
    assert project["scripts"] == {"vqk-train": "vq_vae_keras.commands.train:run",
                                  "vqk-sample": "vq_vae_keras.commands.sample:run"}


@pytest.mark.skipif(tomllib is None, reason="tomllib: Python 3.11 or later")
def test_the_version_is_written_once():
    import vq_vae_keras

    assert re.fullmatch(r"\d+\.\d+\.\d+", vq_vae_keras.__version__)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vq_vae_keras.__version__"}


def test_a_fresh_venv_installs_the_checkout_and_runs_it_from_elsewhere(tmp_path):
    # A copy of what the package is made of, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "vq_vae_keras"), source / "vq_vae_keras",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    venv = tmp_path / "venv"
    # --system-site-packages: TensorFlow and the rest come from this interpreter (no download);
    # --no-deps --no-build-isolation: pip builds with the setuptools it has, offline.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, env=env, capture_output=True, timeout=300)
    shutil.rmtree(source)  # from here on only the installed copy exists
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        result = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    code = ("import vq_vae_keras as vqk; print(vqk.__file__); print(vqk.__version__); "
            "print(vqk.Config(img_dim=16).grid_shape); print(vqk.VectorQuantizer.__name__)")
    lines = run(python, "-c", code).splitlines()
    assert lines[0].startswith(str(venv)) and lines[2:] == ["(4, 4)", "VectorQuantizer"]
    import vq_vae_keras

    assert lines[1] == vq_vae_keras.__version__
    for command in ("vqk-train", "vqk-sample"):
        assert "--run RUN" in run(str(venv / "bin" / command), "vqvae" if command == "vqk-train" else "recon", "--help")
    assert "vqk-train vqvae --data DIR" in run(str(venv / "bin" / "vqk-train"), "--help")
    assert "usage: train.py" in run(python, "-m", "vq_vae_keras.commands.train", "--help")
    assert "usage: sample.py" in run(python, "-m", "vq_vae_keras.commands.sample", "--help")


def test_every_public_name_resolves():
    import vq_vae_keras as vqk

    assert all(getattr(vqk, name) is not None for name in vqk.__all__)
    assert set(vqk.__all__) <= set(dir(vqk))
    with pytest.raises(AttributeError):
        vqk.no_such_name


def python_in_a_fresh_process(code):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n{code}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_importing_the_package_and_its_config_leaves_tensorflow_out():
    code = "import vq_vae_keras as vqk; vqk.Config().validate(); vqk.UsageError; print('tensorflow' in sys.modules)"
    assert python_in_a_fresh_process(code) == ["False"]


@pytest.mark.parametrize("order", ["import vq_vae_keras, keras", "import keras, vq_vae_keras"])
def test_keras_finds_the_package_layers_once_both_are_imported(order):
    """What keras.saving.load_model("RUN/vqvae.keras") needs, in either order of the imports."""
    code = (f"{order}\nfrom keras.saving import get_registered_object as get\n"
            "print(*[get(f'vq_vae_keras>{name}') is not None for name in ('VectorQuantizer', 'PixelCNN', 'VQVAEObjective')])")
    assert python_in_a_fresh_process(code) == ["True", "True", "True"]


@pytest.mark.parametrize("user_level", [None, "1"])
def test_import_leaves_tf_cpp_min_log_level_as_it_was(user_level):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    code = "import os, vq_vae_keras; print(repr(os.environ.get('TF_CPP_MIN_LOG_LEVEL')))"
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(user_level)
