"""train.py and sample.py end to end in fresh processes, on tiny folders."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest

import vq_vae_keras as vqk

from conftest import ROOT, TINY_FLAGS, call_main, run_cli, write_images


def test_training_writes_the_run_directory(trained_run):
    run = trained_run["run"]
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["img_dim"] == 16 and config["num_codes"] == 8 and config["beta"] == 0.25
    assert set(config["versions"]) == {"keras", "tensorflow"} and config["backend"] == "tensorflow"
    for name in ("vqvae.weights.h5", "vqvae.keras", "prior.weights.h5", "codes.npy", "log.csv", "prior_log.csv",
                 "checkpoint/vqvae.npz", "checkpoint/prior.npz"):
        assert os.path.isfile(os.path.join(run, name)), name
    # --sample-every 2 over 5 steps: after batches 0, 2, 4 (the reference's numbering).
    for step in (0, 2, 4):
        for kind in (1, 2):
            grid = iio.imread(os.path.join(run, "samples", f"test_ae_{kind}_{step}.png"))
            assert grid.shape == (8 * 16, 8 * 16, 3) and grid.dtype == np.uint8
    codes = np.load(os.path.join(run, "codes.npy"))
    assert codes.dtype == np.int32 and codes.shape == (16, 4, 4) and codes.max() < 8
    assert len(open(os.path.join(run, "log.csv")).read().splitlines()) == 1 + 5


@pytest.mark.slow
def test_sample_commands(trained_run, tmp_path):
    run, data = trained_run["run"], trained_run["data"]
    out = {name: str(tmp_path / f"{name}.png") for name in ("recon", "recon1", "interp", "random")}
    run_cli("sample.py", "recon", "--run", run, "--data", data, "--out", out["recon"])
    run_cli("sample.py", "recon", "--run", run, "--data", data, "--no-quantize", "--n", "4", "--out", out["recon1"])
    run_cli("sample.py", "interp", "--run", run, "--data", data, "--n", "5", "--out", out["interp"])
    codes_out = str(tmp_path / "codes.npy")
    run_cli("sample.py", "random", "--run", run, "--n", "3", "--top-k", "3", "--temperature", "0.7",
            "--codes-out", codes_out, "--out", out["random"])
    sizes = {name: iio.imread(path).shape for name, path in out.items()}
    assert sizes == {"recon": (128, 128, 3), "recon1": (64, 64, 3), "interp": (80, 80, 3), "random": (48, 48, 3)}
    codes = np.load(codes_out)
    assert codes.shape == (9, 4, 4) and codes.min() >= 0 and codes.max() < 8


def test_reload_in_a_fresh_process_gives_identical_outputs(trained_run, tmp_path):
    run, data = trained_run["run"], trained_run["data"]
    loaded = vqk.load_run(run)
    images = vqk.load_images(data, 16)
    tokens = np.load(os.path.join(run, "codes.npy"))
    tokens = np.concatenate([np.zeros((len(tokens), 1), np.int32), tokens.reshape(len(tokens), -1) + 1], 1)
    here_recon = loaded.vqvae.reconstruct(images)
    here_probs = loaded.prior.predict(tokens[:, :-1], verbose=0)
    script = f"""
import numpy as np, vq_vae_keras as vqk
config = vqk.Config.load({os.path.join(run, 'config.json')!r})
vqvae = vqk.build_vqvae(config)
vqvae.train_model.load_weights({os.path.join(run, 'vqvae.weights.h5')!r})
prior = vqk.build_prior(config)
prior.load_weights({os.path.join(run, 'prior.weights.h5')!r})
images = vqk.load_images({data!r}, config.img_dim)
np.save({str(tmp_path / 'recon.npy')!r}, vqvae.reconstruct(images))
np.save({str(tmp_path / 'probs.npy')!r}, prior.predict(np.load({str(tmp_path / 'tokens.npy')!r}), verbose=0))
"""
    np.save(tmp_path / "tokens.npy", tokens[:, :-1])
    run_cli("-c", script)
    np.testing.assert_array_equal(np.load(tmp_path / "recon.npy"), here_recon)
    np.testing.assert_array_equal(np.load(tmp_path / "probs.npy"), here_probs)


def test_keras_file_loads_in_safe_mode(trained_run, tmp_path):
    run, data = trained_run["run"], trained_run["data"]
    images = vqk.load_images(data, 16)
    np.save(tmp_path / "x.npy", images)
    script = f"""
import keras, numpy as np, vq_vae_keras
model = keras.saving.load_model({os.path.join(run, 'vqvae.keras')!r}, safe_mode=True)
np.save({str(tmp_path / 'y.npy')!r}, model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))
"""
    run_cli("-c", script)
    expected = vqk.load_run(run).vqvae.train_model.predict(images, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-6)


# Bad input of both commands: tests/test_bad_inputs.py, one row per case.


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    data = write_images(tmp_path / "images", count=8)
    run = str(tmp_path / "run")
    args = [sys.executable, "train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS,
            "--steps", "100000", "--sample-every", "1000"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(run, "log.csv")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) > 30):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = np.load(os.path.join(run, "checkpoint", "vqvae.npz"))
    saved_step = json.loads(state["state"].tobytes())["step"]
    assert saved_step >= 30  # not the last periodic checkpoint (there was none): the interrupt saved it
    run_cli("train.py", "vqvae", "--data", data, "--run", run, "--resume", "--steps", str(saved_step + 3))
    rows = open(log).read().splitlines()
    assert rows[-1].startswith(f"{saved_step + 3},") and len(rows) == 1 + saved_step + 3


def test_prior_resume_contradiction_names_the_real_flag(trained_run):
    result = run_cli("train.py", "prior", "--run", trained_run["run"], "--resume", "--batch-size", "7", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --batch-size 7 contradicts"), result.stderr


@pytest.mark.slow
def test_kill_9_loses_at_most_sample_every_steps(tmp_path):
    data = write_images(tmp_path / "images", count=8)
    run = str(tmp_path / "run")
    every = 5
    args = [sys.executable, "train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS,
            "--steps", "100000", "--sample-every", str(every)]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(run, "log.csv")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) > 23):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, possibly in the middle of a checkpoint write
    proc.wait(timeout=30)
    logged = int(open(log).read().splitlines()[-1].split(",")[0])
    state = np.load(os.path.join(run, "checkpoint", "vqvae.npz"))
    saved_step = json.loads(state["state"].tobytes())["step"]
    assert logged - every <= saved_step <= logged
    run_cli("train.py", "vqvae", "--data", data, "--run", run, "--resume", "--steps", str(saved_step + 2))
    rows = open(log).read().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, saved_step + 3))


# ---- resume and re-run: what the command line keeps, and what it does not

PRIOR_SIZE = ["--prior-heads", "2", "--prior-head-dim", "4", "--prior-depth", "2"]


def saved_config(run):
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(trained_run["run"], copy)
    return copy


def test_vqvae_resume_reads_the_image_folder_from_the_run(run_copy, trained_run, tmp_path):
    import train

    status, _, err = call_main(train.main, ["vqvae", "--run", run_copy, "--resume", "--steps", "6"])
    assert status == 0, err
    assert open(os.path.join(run_copy, "log.csv")).read().splitlines()[-1].startswith("6,")
    # The folder moved: a one-line error that says what to do, then --data where it went.
    config = saved_config(run_copy)
    moved = str(tmp_path / "moved")
    shutil.copytree(trained_run["data"], moved)
    config["data"] = str(tmp_path / "gone")
    with open(os.path.join(run_copy, "config.json"), "w") as f:
        json.dump(config, f)
    status, _, err = call_main(train.main, ["vqvae", "--run", run_copy, "--resume", "--steps", "7"])
    assert status == 2 and "is gone; give --data DIR" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = call_main(train.main, ["vqvae", "--run", run_copy, "--resume", "--steps", "7", "--data", moved])
    assert status == 0, err
    assert saved_config(run_copy)["data"] == moved


def test_a_new_vqvae_run_still_needs_data(tmp_path):
    import train

    status, _, err = call_main(train.main, ["vqvae", "--run", str(tmp_path / "run"), "--steps", "1"])
    assert status == 2 and "the following arguments are required: --data" in err


def test_prior_data_is_recorded_beside_the_vqvaes_folder(run_copy, trained_run, tmp_path):
    import train

    other = write_images(tmp_path / "other", count=8, seed=1)
    argv = ["prior", "--run", run_copy, "--restart", "--data", other, "--steps", "1", "--batch-size", "4", *PRIOR_SIZE]
    status, _, err = call_main(train.main, argv)
    assert status == 0, err
    config = saved_config(run_copy)
    assert config["data"] == trained_run["data"] and config["prior_data"] == other
    assert np.load(os.path.join(run_copy, "codes.npy")).shape == (8, 4, 4)
    # Resumed, the prior goes on with those codes: the same folder may be named, another may not.
    status, _, err = call_main(train.main, ["prior", "--run", run_copy, "--resume", "--data", other, "--steps", "2"])
    assert status == 0, err
    status, _, err = call_main(train.main, ["prior", "--run", run_copy, "--resume", "--data", trained_run["data"],
                                            "--steps", "3"])
    assert status == 2 and "--restart trains one on another folder" in err and len(err.strip().splitlines()) == 1
    assert saved_config(run_copy)["prior_data"] == other


def test_resume_without_steps_goes_on_to_the_runs_own_last_step(run_copy):
    """Not to the reference's 1000 epochs: the checkpoint keeps the last step the run asked for."""
    import train

    status, out, err = call_main(train.main, ["vqvae", "--run", run_copy, "--resume", "--steps", "7"])
    assert status == 0, err
    status, out, err = call_main(train.main, ["vqvae", "--run", run_copy, "--resume"])
    assert status == 0 and "already at step 7" in out, (out, err)
    status, out, err = call_main(train.main, ["prior", "--run", run_copy, "--resume"])
    assert status == 0 and "the prior is already at step" in out, (out, err)


def test_restart_is_a_new_prior_with_the_defaults_of_flags_not_given(run_copy):
    import train

    base = ["prior", "--run", run_copy, "--restart", "--steps", "1", "--batch-size", "4"]
    status, _, err = call_main(train.main, [*base, *PRIOR_SIZE, "--val-split", "0.25"])
    assert status == 0, err
    assert saved_config(run_copy)["val_split"] == 0.25
    status, out, err = call_main(train.main, [*base, *PRIOR_SIZE])
    assert status == 0, err
    assert saved_config(run_copy)["val_split"] == 0.0 and "val_split 0.25 -> 0.0" in out
    config = saved_config(run_copy)
    assert (config["prior_heads"], config["prior_head_dim"], config["prior_depth"]) == (2, 4, 2)
    # The size of a saved prior is part of it: --resume may not change it.
    argv = ["prior", "--run", run_copy, "--resume", "--steps", "2", "--prior-heads", "4"]
    status, _, err = call_main(train.main, argv)
    assert status == 2 and "--prior-heads 4 contradicts the run's saved prior_heads = 2" in err, err


def test_the_seed_is_printed_only_once_something_is_drawn(trained_run):
    import sample

    status, out, err = call_main(sample.main, ["random", "--run", trained_run["run"], "--top-k", "99"])
    assert status == 2 and "--top-k" in err and "seed" not in out


def test_usage_says_what_it_counts_and_draws_a_chart(trained_run, tmp_path):
    import sample

    out_png = str(tmp_path / "usage.png")
    status, out, err = call_main(sample.main, ["usage", "--run", trained_run["run"], "--data", trained_run["data"],
                                               "--out", out_png])
    assert status == 0, err
    assert "codes used in inference over the 16 images of" in out
    chart = iio.imread(out_png)
    assert chart.ndim == 3 and chart.shape[1] > 300 and chart.shape[0] > 250


# ---- a second train.py prior: refused unless --restart; --resume and --restart together

def tree_hashes(folder):
    """{relative path: sha256} of every file under folder."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            hashes[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return hashes


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


# ---- sample.py: a fresh seed printed and repeatable; what needs only the VQ-VAE

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
