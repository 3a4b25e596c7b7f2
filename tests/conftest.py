import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# No XLA compile cache for the tests (test_compile_cache.py opts in for its own processes): TensorFlow
# 2.16 reads its XLA flags at its first compilation, so one in-process `sample.py random` would
# otherwise turn the cache on for every later test of the process.
os.environ.setdefault("VQK_XLA_CACHE", "0")

import vq_vae_keras as vqk  # noqa: E402

# 16 px: no residual blocks, 4x4 code grid. Every test model is this small.
TINY = dict(img_dim=16, z_dim=8, num_codes=8, batch_size=4, prior_heads=2, prior_head_dim=4, prior_depth=2)
TINY_FLAGS = ["--img-dim", "16", "--z-dim", "8", "--num-codes", "8", "--batch-size", "4"]


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow end-to-end tests (CI does)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test of a minute or more; runs with --slow (CI runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("VQK_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tiny_config(**overrides):
    return vqk.Config(**{**TINY, **overrides})


def write_images(folder, count=12, size=24, seed=0):
    """Smooth random colour images (learnable), as PNGs."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)[:, None, None]
    for i in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3)).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"img_{i:03d}.png"))
    return str(folder)


@pytest.fixture
def image_dir(tmp_path):
    return write_images(tmp_path / "images")


def run_cli(*args, check=True, timeout=300):
    """Run train.py / sample.py in a fresh process; returns CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny run trained through the CLI: both stages."""
    base = tmp_path_factory.mktemp("trained")
    data = write_images(base / "images", count=16)
    run = str(base / "run")
    run_cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "5", "--sample-every", "2")
    # The prior's size is not a CLI flag: shrink it in the saved config (tests only).
    config = vqk.Config.load(os.path.join(run, "config.json"))
    config.prior_heads, config.prior_head_dim, config.prior_depth = 2, 4, 2
    config.save(os.path.join(run, "config.json"))
    run_cli("train.py", "prior", "--run", run, "--steps", "6", "--batch-size", "4")
    return {"run": run, "data": data}


@pytest.fixture
def retracing_warnings(monkeypatch):
    """count() -> how many of TensorFlow's "excessive retracing" warnings its logger gave since the
    last count(). Each count() also starts TensorFlow's process-wide count of traces per function
    afresh, so that what earlier tests traced does not count."""
    import logging

    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    monkeypatch.setattr(logging.getLogger("tensorflow"), "handlers", [handler])

    def count():
        found = sum("retracing" in message for message in warnings)
        warnings.clear()
        monkeypatch.setattr(polymorphic_function, "_frequent_tracing_detector_manager",
                            polymorphic_function._FrequentTracingDetectorManager())
        return found

    count()
    return count


@pytest.fixture(autouse=True)
def no_op_determinism_left_over():
    """Each test starts as a fresh process would: a test that trained with deterministic=True
    (train_prior turns on op determinism) must not silently turn XLA off for the tests after it
    (Keras drops jit_compile while op determinism is on)."""
    yield
    from tensorflow.python.framework import config as tf_config  # test-only: no public switch-off

    tf_config.disable_op_determinism()


def call_main(main, argv):
    """main(argv) through the CLIs' run_main, in this process: (exit status, stdout, stderr).
    Much faster than run_cli (no new process, TensorFlow already imported)."""
    import contextlib
    import io

    from vq_vae_keras.cli import run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, argv)
            status = 0
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()
