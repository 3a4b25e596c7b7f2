"""XLA's persistent compilation cache for the sampler (`use_compile_cache`): each test runs fresh
processes, since the cache is what one process leaves for the next. An entry is reused by a new
process with the same prior, new weights included (the codes those weights draw uncached); a
changed prior writes its own; an unwritable or damaged cache never fails a sample."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, call_main, run_cli

# A process that samples 4 code maps (seed 0) from a tiny attention prior built with the given
# heads and weight seed, the cache rooted at argv[1] ("": none), and saves them to argv[4].
CHILD = """
import sys
import numpy as np
from vq_vae_keras.priors.sampling import sample_codes, use_compile_cache
root, heads, weights, out = sys.argv[1:]
if root != "-":  # "-": no call, as in a user's script
    print("cache:", use_compile_cache(root or None))
from vq_vae_keras import Config
from vq_vae_keras.priors import build_prior
config = Config(img_dim=16, num_codes=8, prior_heads=int(heads), prior_head_dim=4, prior_depth=2,
                prior_seed=int(weights))
np.save(out, sample_codes(build_prior(config), 4, config.grid_shape, seed=0))
"""


def sample_in_process(tmp_path, root, heads=2, weights=0, env=None):
    """(codes, stderr's warning lines) of one CHILD process."""
    out = str(tmp_path / f"codes_{len(os.listdir(tmp_path))}.npy")
    environ = {k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", "VQK_XLA_CACHE")}
    result = subprocess.run([sys.executable, "-c", CHILD, str(root or ""), str(heads), str(weights), out],
                            cwd=ROOT, env={**environ, "PYTHONPATH": ROOT, **(env or {})},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out), [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def entries(root):
    """{path: (inode, mtime)} of every cache entry under root: a recompiled entry is rewritten
    under the same name (a new file, renamed into place), a loaded one is left as it was."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_a_new_process_loads_the_entry_and_new_weights_draw_what_they_draw_uncached(tmp_path):
    root = tmp_path / "cache"
    first, warnings = sample_in_process(tmp_path, root, weights=0)
    written = entries(root)
    assert len(written) == 1 and not warnings
    (path,) = written
    assert os.path.basename(os.path.dirname(path)).startswith("tf")  # TensorFlow's version names the folder

    other, _ = sample_in_process(tmp_path, root, weights=1)
    assert entries(root) == written  # loaded: no entry rewritten, none added
    uncached, _ = sample_in_process(tmp_path, None, weights=1)
    np.testing.assert_array_equal(other, uncached)  # the weights are the program's inputs, not constants
    assert not np.array_equal(other, first)

    sample_in_process(tmp_path, root, heads=1, weights=1)
    assert len(entries(root)) == 2  # another prior, another program


def test_an_unwritable_or_damaged_cache_samples_anyway(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    expected, warnings = sample_in_process(tmp_path, None)
    assert not warnings
    codes, warnings = sample_in_process(tmp_path, blocked / "cache")  # under a file: cannot be made
    np.testing.assert_array_equal(codes, expected)
    assert len(warnings) == 1 and "without the XLA cache" in warnings[0]

    root = tmp_path / "cache"
    sample_in_process(tmp_path, root)
    (path,) = entries(root)
    with open(path, "r+b") as f:  # cut short: TensorFlow fails the load
        f.truncate(os.path.getsize(path) // 2)
    codes, warnings = sample_in_process(tmp_path, root)
    np.testing.assert_array_equal(codes, expected)
    assert len(warnings) == 1 and "not loaded" in warnings[0]
    assert len(entries(root)) == 1 and path not in entries(root)  # the damaged entry is gone


@pytest.mark.slow
def test_the_environment_decides(tmp_path):
    root = tmp_path / "cache"
    sample_in_process(tmp_path, root, env={"VQK_XLA_CACHE": "0"})
    assert not root.exists()
    own = tmp_path / "own"
    sample_in_process(tmp_path, root, env={"TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={own}"})
    assert not root.exists() and len(entries(own)) == 1  # the user's own flag is kept
    elsewhere = tmp_path / "elsewhere"
    sample_in_process(tmp_path, root, env={"VQK_XLA_CACHE": str(elsewhere)})
    assert not root.exists() and len(entries(elsewhere)) == 1
    library = tmp_path / "library"  # no use_compile_cache call: importing the package reads it
    sample_in_process(tmp_path, "-", env={"VQK_XLA_CACHE": str(library)})
    assert len(entries(library)) == 1


@pytest.mark.slow
def test_sample_random_keeps_its_program_in_the_run(trained_run, tmp_path, monkeypatch):
    monkeypatch.delenv("VQK_XLA_CACHE", raising=False)  # conftest's "0", for the two processes below
    run = str(tmp_path / "run")  # a copy: other tests sample from the shared run too
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns(".xla_cache"))
    outs = [str(tmp_path / f"codes{i}.npy") for i in range(2)]
    run_cli("sample.py", "random", "--run", run, "--n", "2", "--seed", "3", "--codes-out", outs[0],
            "--out", str(tmp_path / "a.png"))
    written = entries(os.path.join(run, ".xla_cache"))
    assert len(written) == 1
    run_cli("sample.py", "random", "--run", run, "--n", "2", "--seed", "3", "--codes-out", outs[1],
            "--out", str(tmp_path / "b.png"))
    assert entries(os.path.join(run, ".xla_cache")) == written
    np.testing.assert_array_equal(np.load(outs[0]), np.load(outs[1]))

    # In this process too (the cache off, as conftest has it: on TensorFlow 2.16, which reads its
    # XLA flags at its first compilation, it would stay on for the rest of the test session).
    import sample

    monkeypatch.setenv("VQK_XLA_CACHE", "0")
    flags = os.environ.get("TF_XLA_FLAGS")
    status, _, err = call_main(sample.main, ["random", "--run", run, "--n", "2", "--out", str(tmp_path / "c.png")])
    assert status == 0, err
    assert os.environ.get("TF_XLA_FLAGS") == flags


def test_an_error_no_entry_can_cause_leaves_the_cache_alone(tmp_path, monkeypatch):
    import tensorflow as tf

    from vq_vae_keras.priors import sampling

    folder = tmp_path / "entries"
    folder.mkdir()
    monkeypatch.setattr(sampling, "_cache_folder", str(folder))
    damaged = tf.errors.OutOfRangeError(None, None, "read past the end")
    assert not sampling._clear_compile_cache(damaged)  # no entry to blame: the error is the caller's
    entry = folder / "cluster_0.pb"
    entry.write_bytes(b"program")
    assert not sampling._clear_compile_cache(tf.errors.ResourceExhaustedError(None, None, "out of memory"))
    assert entry.exists() and sampling._cache_folder == str(folder)
    assert sampling._clear_compile_cache(damaged)
    assert not entry.exists() and sampling._cache_folder is None
