"""Issue 10's fixes, each tested where it can fail: wide greyscale images, the import's side effects,
a second `train.py prior`, checkpoints by name, sampling seeds, what `sample.py` loads,
random_images, and the layout of the picture grids."""

import hashlib
import os
import re
import shutil

import keras
import numpy as np
import pytest
from PIL import Image

import vq_vae_keras as vqk
from vq_vae_keras.data import ImageFolder
from vq_vae_keras.errors import UsageError
from vq_vae_keras.grids import interpolation_grid, reconstruction_grid
from vq_vae_keras.io import load_checkpoint, save_checkpoint, to_uint8
from vq_vae_keras.models import compile_vqvae

from conftest import ROOT, call_main, run_cli, tiny_config, write_images


def tree_hashes(folder):
    """{relative path: sha256} of every file under folder."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            hashes[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return hashes


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, free to change."""
    run = str(tmp_path / "run")
    shutil.copytree(trained_run["run"], run)
    return run


# ---------------------------------------------------------------- 2. wide greyscale images

def grey_value(path):
    """The 0..255 grey level that load_images gives a uniform image."""
    image = vqk.load_images([path], 8)[0]
    return float(np.round((image.mean() + 1) / 2 * 255))


def test_16_bit_frames_keep_their_brightness_order(tmp_path):
    levels = [100, 250, 300, 1000, 30000, 65535]  # a dark frame (max 250 of 65535) stays dark
    greys = []
    for level in levels:
        path = str(tmp_path / f"frame_{level}.png")
        Image.fromarray(np.full((8, 8), level, np.uint16)).save(path)
        greys.append(grey_value(path))
    assert greys == [round(level / 257) for level in levels]
    assert greys == sorted(greys)


def test_32_bit_and_float_images_by_their_declared_range(tmp_path):
    Image.fromarray(np.full((8, 8), 2 ** 30, np.int32)).save(tmp_path / "int32.tif")  # "I": half of 2**31 - 1
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(tmp_path / "float.tif")  # "F": [0, 1]
    assert Image.open(tmp_path / "int32.tif").mode == "I" and Image.open(tmp_path / "float.tif").mode == "F"
    assert grey_value(str(tmp_path / "int32.tif")) == 128
    assert grey_value(str(tmp_path / "float.tif")) == round(0.25 * 255)


# ---------------------------------------------------------------- 8. the import's side effects

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


# ---------------------------------------------------------------- 3. a second train.py prior

def test_second_prior_is_refused_and_changes_nothing_then_restart_starts_over(run_copy):
    import train

    before = tree_hashes(run_copy)
    status, _, err = call_main(train.main, ["prior", "--run", run_copy, "--steps", "2", "--batch-size", "4"])
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "--restart" in err and "--resume" in err
    assert tree_hashes(run_copy) == before

    # An old grid that a shorter new prior would not overwrite must not survive a restart.
    stale = os.path.join(run_copy, "samples", "prior_sample_99.png")
    shutil.copy(os.path.join(run_copy, "samples", "prior_sample_0.png"), stale)
    result = run_cli("train.py", "prior", "--run", run_copy, "--restart", "--steps", "2", "--batch-size", "4")
    assert "prior weights" in result.stdout
    assert not os.path.exists(stale)
    rows = open(os.path.join(run_copy, "prior_log.csv")).read().splitlines()
    assert rows[0].startswith("step") and [r.split(",")[0] for r in rows[1:]] == ["2"]  # a new log
    assert load_checkpoint_step(run_copy) == 2


def load_checkpoint_step(run):
    with np.load(os.path.join(run, "checkpoint", "prior.npz")) as archive:
        import json
        return json.loads(archive["state"].tobytes().decode())["step"]


def test_resume_and_restart_together_are_refused(run_copy):
    import train

    before = tree_hashes(run_copy)
    status, _, err = call_main(train.main, ["prior", "--run", run_copy, "--resume", "--restart"])
    assert status == 2 and "not allowed with" in err
    assert tree_hashes(run_copy) == before


# ---------------------------------------------------------------- 4. checkpoints by name

def prior_with_optimizer(seed=0):
    prior = vqk.build_prior(tiny_config())
    prior.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    prior.optimizer.build(prior.trainable_variables)
    rng = np.random.default_rng(seed)
    for variable in [*prior.variables, *prior.optimizer.variables]:  # every value distinct
        if "float" in str(variable.dtype):
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return prior


def test_checkpoint_restores_each_array_into_the_variable_of_its_name(tmp_path):
    source = prior_with_optimizer(seed=1)
    path = str(tmp_path / "prior.npz")
    save_checkpoint(path, source, source.optimizer, {"step": 7})
    with np.load(path) as archive:
        saved = dict(archive)
    # The same arrays written in reverse order: a loader matching by position would scramble them.
    reordered = str(tmp_path / "reordered.npz")
    np.savez(reordered, **dict(reversed(list(saved.items()))))

    target = prior_with_optimizer(seed=2)
    assert load_checkpoint(reordered, target, target.optimizer) == {"step": 7}
    for mine, theirs in zip(target.variables, source.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    # Adam's slots land on the slots of the same model variable (checked through the optimizer itself).
    opt = target.optimizer
    for variable in target.trainable_variables:
        index = opt._get_variable_index(variable)
        name = variable.path  # the prior has no sub-models: its names are the Keras paths
        np.testing.assert_array_equal(opt._momentums[index].numpy(), saved[f"optimizer/{name}/momentum"])
        np.testing.assert_array_equal(opt._velocities[index].numpy(), saved[f"optimizer/{name}/velocity"])


def test_vqvae_checkpoint_tells_the_encoder_from_the_decoder(tmp_path):
    """Both sub-models have a layer "bn1": their variables and Adam slots must not be confused."""
    def model(seed):
        vqvae = vqk.build_vqvae(tiny_config())
        m = compile_vqvae(vqvae)
        m.optimizer.build(m.trainable_variables)
        rng = np.random.default_rng(seed)
        for variable in [*m.variables, *m.optimizer.variables]:
            if "float" in str(variable.dtype):
                variable.assign(rng.normal(size=variable.shape).astype("float32"))
        return vqvae, m

    (source, m1), (target, m2) = model(1), model(2)
    path = str(tmp_path / "vqvae.npz")
    save_checkpoint(path, m1, m1.optimizer, {"step": 1})
    with np.load(path) as archive:
        keys = set(archive)
    assert {"model/encoder/bn1/gamma", "model/decoder/bn1/gamma", "optimizer/encoder/bn1/gamma/momentum",
            "optimizer/decoder/bn1/gamma/momentum"} <= keys
    load_checkpoint(path, m2, m2.optimizer)
    for a, b in [(source.encoder, target.encoder), (source.decoder, target.decoder)]:
        for x, y in zip(a.variables, b.variables):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    for x, y in zip(m1.optimizer.variables, m2.optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def rewrite(path, change):
    with np.load(path) as archive:
        arrays = dict(archive)
    change(arrays)
    np.savez(path, **arrays)


def rename(arrays, old, new):
    arrays[new] = arrays.pop(old)


@pytest.mark.parametrize("change, message", [
    (lambda a: rename(a, "model/block1_attention/query", "model/block9_attention/query"),
     "missing model/block1_attention/query; unexpected model/block9_attention/query"),
    (lambda a: a.pop("optimizer/next_code/bias/velocity"), "missing optimizer/next_code/bias/velocity"),
    (lambda a: a.update({"model/extra/kernel": np.zeros(3)}), "unexpected model/extra/kernel"),
    (lambda a: a.update({"model/next_code/bias": np.zeros(5, np.float32)}), "other shapes for model/next_code/bias"),
    (lambda a: [a.pop("format")] + [rename(a, k, f"model/{i}") for i, k in enumerate(sorted(a)) if k.startswith("model/")],
     "older format"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, change, message):
    source = prior_with_optimizer(seed=1)
    path = str(tmp_path / "prior.npz")
    save_checkpoint(path, source, source.optimizer, {"step": 3})
    rewrite(path, change)
    target = prior_with_optimizer(seed=2)
    before = [v.numpy().copy() for v in [*target.variables, *target.optimizer.variables]]
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        load_checkpoint(path, target, target.optimizer)
    assert "\n" not in str(raised.value)
    after = [v.numpy() for v in [*target.variables, *target.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------- 6. sampling seeds, 7. what sample.py loads

def seed_of(stdout):
    found = re.search(r"seed (\d+): pass --seed (\d+) to repeat", stdout)
    assert found and found.group(1) == found.group(2), stdout
    return int(found.group(1))


@pytest.mark.parametrize("command", ["random", "recon", "interp"])
def test_fresh_seed_by_default_printed_and_repeatable(trained_run, tmp_path, command):
    import sample

    base = ["--run", trained_run["run"], "--n", "2"] + ([] if command == "random" else ["--data", trained_run["data"]])
    outs = [str(tmp_path / f"{i}.png") for i in range(3)]
    runs = [call_main(sample.main, [command, *base, "--out", outs[i]]) for i in range(2)]
    assert [status for status, _, _ in runs] == [0, 0]
    first, second = seed_of(runs[0][1]), seed_of(runs[1][1])
    assert first != second
    status, stdout, _ = call_main(sample.main, [command, *base, "--seed", str(first), "--out", outs[2]])
    assert status == 0 and "pass --seed" not in stdout
    assert open(outs[2], "rb").read() == open(outs[0], "rb").read()


@pytest.mark.parametrize("command", ["recon", "interp", "usage"])
def test_a_broken_prior_does_not_block_what_needs_only_the_vqvae(run_copy, trained_run, tmp_path, command):
    import sample

    with open(os.path.join(run_copy, "prior.weights.h5"), "wb") as f:
        f.write(b"not an HDF5 file")
    argv = [command, "--run", run_copy, "--data", trained_run["data"], "--out", str(tmp_path / "out.png")]
    status, _, err = call_main(sample.main, argv + (["--seed", "1"] if command != "usage" else []))
    assert status == 0, err
    assert os.path.isfile(tmp_path / "out.png")
    # random needs the prior: a clear one-line error.
    status, _, err = call_main(sample.main, ["random", "--run", run_copy, "--seed", "1", "--out", str(tmp_path / "r.png")])
    assert status == 2 and err.startswith("error: cannot load prior weights") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 9. random_images

def broken_copies(folder, count):
    """PNGs whose header is fine but whose pixel data is cut off: they pass ImageFolder's check."""
    first = os.path.join(folder, sorted(os.listdir(folder))[0])
    data = open(first, "rb").read()
    for i in range(count):
        with open(os.path.join(folder, f"broken_{i}.png"), "wb") as f:
            f.write(data[:len(data) // 2])


@pytest.mark.parametrize("cached", [False, True])
def test_random_images_returns_n_even_when_most_files_are_unreadable(tmp_path, cached, capsys):
    folder = write_images(tmp_path / "images", count=2)
    broken_copies(folder, 10)
    images = ImageFolder(folder, 16)
    assert len(images) == 12  # the broken files pass the header check
    if cached:
        images.cache()
    drawn = images.random_images(20, np.random.default_rng(0))
    assert drawn.shape == (20, 16, 16, 3) and drawn.dtype == np.float32
    good = vqk.load_images(folder, 16)  # the two readable images
    assert all(any(np.array_equal(d, g) for g in good) for d in drawn)


def test_random_images_from_a_folder_without_readable_images_is_a_usage_error(tmp_path):
    folder = write_images(tmp_path / "images", count=1)
    broken_copies(folder, 3)
    os.remove(os.path.join(folder, "img_000.png"))
    with pytest.raises(UsageError, match="no readable images"):
        ImageFolder(folder, 16).random_images(4, np.random.default_rng(0))


# ---------------------------------------------------------------- grid layout

class StandIn:
    """A VQ-VAE stand-in whose every step is known: encode = identity, quantize = rounding to
    quarters, decode = identity, reconstruct = negation (to tell it from the real images)."""

    def encode(self, images):
        return np.asarray(images, np.float32)

    def quantize(self, z):
        return None, np.round(np.asarray(z) * 4) / 4

    def decode(self, z):
        return np.asarray(z, np.float32)

    def reconstruct(self, images, quantize=True):
        return -np.asarray(images, np.float32)


def tiles(grid, n, d):
    """(n*d, n*d, 3) grid -> (n rows, n columns, d, d, 3)."""
    return grid.reshape(n, d, n, d, 3).transpose(0, 2, 1, 3, 4)


def test_reconstruction_grid_real_images_in_even_columns_their_reconstructions_in_odd():
    n, d = 4, 16
    images = np.random.default_rng(0).uniform(-1, 1, (n * n // 2, d, d, 3)).astype(np.float32)
    t = tiles(reconstruction_grid(StandIn(), images, n), n, d)
    pairs = images.reshape(n, n // 2, d, d, 3)  # row-major: row r holds images r*n/2 ... r*n/2 + n/2 - 1
    np.testing.assert_array_equal(t[:, 0::2], to_uint8(pairs))
    np.testing.assert_array_equal(t[:, 1::2], to_uint8(-pairs))


def test_reconstruction_grid_of_a_real_model_shows_its_own_reconstructions():
    vqvae = vqk.build_vqvae(tiny_config())
    n, d = 4, 16
    images = np.random.default_rng(1).uniform(-1, 1, (n * n // 2, d, d, 3)).astype(np.float32)
    for quantize in (True, False):
        t = tiles(reconstruction_grid(vqvae, images, n, quantize=quantize), n, d).astype(int)
        recon = to_uint8(vqvae.reconstruct(images, quantize=quantize)).reshape(n, n // 2, d, d, 3).astype(int)
        np.testing.assert_array_equal(t[:, 0::2], to_uint8(images).reshape(n, n // 2, d, d, 3))
        assert np.abs(t[:, 1::2] - recon).max() <= 1  # float noise across batch sizes


def test_interpolation_grid_goes_from_the_start_image_to_the_end_image():
    n, d = 5, 16
    rng = np.random.default_rng(2)
    starts, ends = rng.uniform(-1, 1, (2, n, d, d, 3)).astype(np.float32)
    t = tiles(interpolation_grid(StandIn(), starts, ends, n), n, d)
    quantized = lambda x: np.round(x * 4) / 4  # noqa: E731
    np.testing.assert_array_equal(t[:, 0], to_uint8(quantized(starts)))
    np.testing.assert_array_equal(t[:, -1], to_uint8(quantized(ends)))
    middle = quantized(0.5 * starts + 0.5 * ends)  # alpha = 2/4 in column 2
    np.testing.assert_array_equal(t[:, 2], to_uint8(middle))
