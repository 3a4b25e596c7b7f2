"""Keras 3's other backends: the VQ-VAE trains with fit(x) from user code under JAX and PyTorch as
under TensorFlow, logging what it should, and weights written under one backend load under the
others and compute the same codes, reconstructions and prior probabilities.

Each check runs tests/backend_check.py in a fresh process with KERAS_BACKEND set (a process has
one backend). A backend whose package is not installed is skipped: the README's test command
installs neither; CI installs jax and torch for its backend stage (.ci/run)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_FLAGS, write_images

from vq_vae_keras.models import metric_names
from vq_vae_keras.config import Config

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_check.py")
PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def backend(name):
    installed = importlib.util.find_spec(PACKAGES[name]) is not None
    return pytest.param(name, marks=pytest.mark.skipif(not installed, reason=f"{PACKAGES[name]} is not installed"))


BACKENDS = [backend(name) for name in PACKAGES]


def run_check(backend_name, command, spec, folder, **env):
    spec_path = os.path.join(folder, f"{command}-{backend_name}-{len(os.listdir(folder))}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "KERAS_BACKEND": backend_name, **env}
    done = subprocess.run([sys.executable, CHECK, command, spec_path], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"backend: {backend_name}" in done.stdout  # the backend the process asked for, not a fallback


# Every quantizer, the codebook options that change the training step, two levels, mixed precision.
OPTIONS = {
    "vq": {},
    "ema_restarts": {"quantizer": "ema", "restart_dead": 1},
    "cosine_rotation": {"cosine_codebook": True, "rotation_trick": True},
    "gumbel": {"quantizer": "gumbel"},
    "fsq": {"quantizer": "fsq", "fsq_levels": [2, 2, 2]},
    "two_levels": {"levels": 2, "img_dim": 32, "top_num_codes": 4},
    "bfloat16": {"precision": "mixed_bfloat16"},
}


def perplexity(codes, num_codes):
    p = np.bincount(codes.ravel(), minlength=num_codes) / codes.size
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def first_step_logs(config, arrays):
    """What the first training step must log, from the untrained model's outputs on the batch: the
    reference's objective written out in NumPy (VQVAEObjective's docstring)."""
    expected = {"mse_x": np.mean((arrays["x"] - arrays["recon"]) ** 2)}
    loss = expected["mse_x"]
    for level, suffix in enumerate(["", "_top"][:config.levels]):
        codes, z, e = arrays[f"codes{level}"], arrays[f"z{level}"], arrays[f"vectors{level}"]
        num_codes = config.top_codes if suffix else config.num_codes
        expected["perplexity" + suffix] = perplexity(codes, num_codes)
        expected["usage" + suffix] = len(np.unique(codes)) / num_codes
        if config.quantizer in ("vq", "ema"):
            distance = np.mean((z - e) ** 2)
            expected["mse_e" + suffix] = expected["mse_z" + suffix] = distance
            loss += (config.quantizer == "vq") * distance + config.beta * distance
    expected["loss"] = loss
    return expected


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fit_from_user_code_trains_and_logs_every_option(backend_name, tmp_path):
    configs = {name: {**TINY, **options} for name, options in OPTIONS.items()}
    run_check(backend_name, "fit", {"configs": configs, "epochs": 3, "out": str(tmp_path)}, tmp_path)
    for name, overrides in configs.items():
        config = Config(**overrides)
        with open(tmp_path / f"{name}.json") as f:
            logs = json.load(f)
        assert set(logs) == set(metric_names(config)), name
        assert all(np.isfinite(v).all() for v in logs.values()), (name, logs)
        if name == "gumbel":  # its training step draws noise: the untrained model's argmax is not it
            continue
        # bfloat16: the training step's convolutions round as predict's do, but not in the same order
        rtol = 0.05 if name == "bfloat16" else 1e-4
        arrays = np.load(tmp_path / f"{name}.npz")
        for key, value in first_step_logs(config, arrays).items():
            assert logs[key][0] == pytest.approx(value, rel=rtol, abs=1e-6), (name, key)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_two_jax_devices_train_as_one(tmp_path):
    """distribute mirrored under JAX (Keras's DataParallel, the CPU split in two by XLA_FLAGS): the
    same logs and weights as one device, the codebook's EMA and restarts, Gumbel's noise and both
    levels included, within float noise. Plain SGD: Adam's first step is +-lr whatever the
    gradient's size, which would turn float noise into lr-sized differences."""
    names = ("vq", "ema_restarts", "gumbel", "two_levels")
    configs = {name: {**TINY, **OPTIONS[name]} for name in names}
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for devices, distribute in (("one", None), ("two", "mirrored")):
        os.makedirs(tmp_path / devices)
        spec = {"configs": configs, "epochs": 3, "sgd": True, "out": str(tmp_path / devices), "distribute": distribute}
        run_check("jax", "fit", spec, tmp_path, **flags)
    for name in names:
        assert json.load(open(tmp_path / "two" / f"{name}-devices.json")) == 2  # replicated: DataParallel was on
        one, two = (json.load(open(tmp_path / devices / f"{name}.json")) for devices in ("one", "two"))
        assert one.keys() == two.keys()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")
        one, two = (np.load(tmp_path / devices / f"{name}.npz") for devices in ("one", "two"))
        for key in (k for k in one if k.startswith("weight")):
            np.testing.assert_allclose(two[key], one[key], atol=1e-5, err_msg=f"{name} {key}")


# Two models and both prior kinds: the reference's VQ with its attention prior, FSQ with a
# class-conditional PixelCNN (its samples: each class in turn).
CROSS = {"vq": {},
         "fsq_pixelcnn_classes": {"quantizer": "fsq", "fsq_levels": [2, 4], "prior": "pixelcnn", "classes": ["a", "b"]}}


@pytest.mark.slow
@pytest.mark.parametrize("model", CROSS)
@pytest.mark.parametrize("writer", BACKENDS)
def test_weights_written_under_one_backend_compute_the_same_under_the_others(writer, model, tmp_path):
    spec = {"config": {**TINY, **CROSS[model]}, "vqvae_weights": str(tmp_path / "vqvae.weights.h5"),
            "prior_weights": str(tmp_path / "prior.weights.h5")}
    run_check(writer, "outputs", {**spec, "train": True, "out": str(tmp_path / f"{writer}.npz")}, tmp_path)
    written = np.load(tmp_path / f"{writer}.npz")
    readers = [name for name in PACKAGES if name != writer and importlib.util.find_spec(PACKAGES[name])]
    if not readers:
        pytest.skip("no other backend installed to read the weights")
    for reader in readers:
        run_check(reader, "outputs", {**spec, "out": str(tmp_path / f"{reader}.npz")}, tmp_path)
        read = np.load(tmp_path / f"{reader}.npz")
        # A code could flip where two code vectors are within float noise of an encoder output:
        # reconstructions are compared on the images whose codes all agree (all of them, so far).
        same = read["codes"] == written["codes"]
        assert same.mean() >= 0.98, reader
        np.testing.assert_allclose(read["vectors"][same], written["vectors"][same], atol=1e-5, err_msg=reader)
        agree = same.reshape(len(same), -1).all(axis=1)
        assert agree.mean() >= 0.5, reader
        np.testing.assert_allclose(read["recon"][agree], written["recon"][agree], atol=1e-5, err_msg=reader)
        np.testing.assert_allclose(read["recon_unquantized"], written["recon_unquantized"], atol=1e-5, err_msg=reader)
        np.testing.assert_allclose(read["probabilities"], written["probabilities"], atol=1e-5, err_msg=reader)
        # TensorFlow's compiled samplers and the others' eager ones draw with the same noise.
        for key in ("samples", "samples_top_k"):
            np.testing.assert_array_equal(read[key], written[key], err_msg=f"{reader} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b.values[0] != "tensorflow"])
def test_the_commands_run_under_the_backend(backend_name, tmp_path):
    """train.py and sample.py as a user runs them with KERAS_BACKEND set: both stages, a resume
    (and one under TensorFlow), every sample command; the run says which backend wrote it."""
    data, run = write_images(tmp_path / "images"), str(tmp_path / "run")
    env = {**os.environ, "KERAS_BACKEND": backend_name}

    def cli(*args, status=0, **more_env):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env={**env, **more_env}, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == status, done.stderr[-3000:]
        return done

    cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "3", "--sample-every", "2")
    cli("train.py", "vqvae", "--data", data, "--run", run, "--steps", "5", "--resume")
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["backend"] == backend_name and backend_name in config["versions"]
    # Its checkpoint resumes under TensorFlow too.
    cli("train.py", "vqvae", "--data", data, "--run", run, "--steps", "6", "--resume", KERAS_BACKEND="tensorflow")
    assert [line.split(",")[0] for line in open(os.path.join(run, "log.csv")).read().split()[1:]] == \
        ["1", "2", "3", "4", "5", "6"]
    config.update(prior_heads=2, prior_head_dim=4, prior_depth=2)  # the prior's size is no flag: tests only
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    cli("train.py", "prior", "--run", run, "--steps", "2", "--batch-size", "4")
    for command in ("recon", "interp", "usage"):
        cli("sample.py", command, "--run", run, "--data", data)
    cli("sample.py", "random", "--run", run, "--n", "4", "--seed", "3")
    cli("sample.py", "evaluate", "--run", run, "--data", data, "--fid", "4", "--inception-weights", "none")
    for name in ("recon.png", "interp.png", "usage.png", "random.png", "test_ae_2_4.png"):
        assert os.path.isfile(os.path.join(run, "samples", name)), name
    assert json.load(open(os.path.join(run, "eval.json")))["prior_nll"] > 0
    # The whole model it wrote loads here, under this process's backend (TensorFlow in CI).
    import keras

    import vq_vae_keras as vqk

    whole = keras.saving.load_model(os.path.join(run, "vqvae.keras"), safe_mode=True)
    x = vqk.load_images(data, 16)[:4]
    np.testing.assert_allclose(whole.predict(x, verbose=0), vqk.load_run(run).vqvae.train_model.predict(x, verbose=0),
                               atol=1e-5)
    # What only TensorFlow does says so in one line: tf.distribute (JAX has mirrored: DataParallel).
    other = str(tmp_path / "other")
    refused = cli("train.py", "vqvae", "--data", data, "--run", other, *TINY_FLAGS, "--steps", "1",
                  "--distribute", "multiworker" if backend_name == "jax" else "mirrored", status=2)
    assert "needs Keras's TensorFlow backend" in refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr
    if backend_name == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        cli("train.py", "vqvae", "--data", data, "--run", other, *TINY_FLAGS, "--steps", "2", "--distribute", "mirrored")
        odd = cli("train.py", "vqvae", "--data", data, "--run", str(tmp_path / "odd"), *TINY_FLAGS, "--batch-size", "3",
                  "--steps", "1", "--distribute", "mirrored", status=2)
        assert "multiple of the 2 devices" in odd.stderr
