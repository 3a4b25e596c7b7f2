"""Training in-process: it learns, resumes exactly, and never leaves a broken checkpoint."""

import csv
import os

import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras import io
from vq_vae_keras.models import compile_vqvae
from vq_vae_keras.training import NonFiniteLoss, train_vqvae

from conftest import tiny_config


def read_log(run):
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_a_few_steps_reduce_reconstruction_error(image_dir, tmp_path):
    config = tiny_config(data=image_dir, seed=1, batch_size=12)  # the whole folder each step: no batch noise
    vqvae = train_vqvae(config, str(tmp_path / "run"), steps=40)
    rows = read_log(str(tmp_path / "run"))
    assert len(rows) == 40 and {"mse_x", "mse_e", "mse_z", "perplexity", "usage"} <= set(rows[0])
    first = np.mean([float(r["mse_x"]) for r in rows[:3]])
    last = np.mean([float(r["mse_x"]) for r in rows[-3:]])
    assert last < 0.85 * first
    assert vqvae.encoder.output.shape[1:] == (4, 4, 8)


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])  # gumbel: its noise generator's state resumes too
def test_resume_continues_the_same_loss_sequence(image_dir, tmp_path, quantizer):
    config = tiny_config(data=image_dir, seed=5, sample_every=100, quantizer=quantizer)
    straight = str(tmp_path / "straight")
    train_vqvae(config, straight, steps=8, deterministic=True)
    resumed = str(tmp_path / "resumed")
    train_vqvae(config, resumed, steps=5, deterministic=True)  # crosses an epoch boundary (3 steps per epoch)
    train_vqvae(config, resumed, steps=8, resume=True)
    a, b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in b] == [str(i) for i in range(1, 9)]
    for key in ("loss", "mse_x", "mse_e", "mse_z") if quantizer == "vq" else ("loss", "mse_x", "kl", "temperature"):
        np.testing.assert_allclose([float(r[key]) for r in b], [float(r[key]) for r in a], rtol=1e-4)
    # Adam's iteration count came back too: it did not restart at 0.
    state = np.load(os.path.join(resumed, "checkpoint", "vqvae.npz"))
    assert int(state["optimizer/iteration"]) == 8


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    vqvae = vqk.build_vqvae(tiny_config())
    model = compile_vqvae(vqvae)
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "ckpt.npz")
    io.save_checkpoint(path, model, model.optimizer, {"step": 1})
    before = open(path, "rb").read()

    def broken_savez(f, **arrays):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        io.save_checkpoint(path, model, model.optimizer, {"step": 2})
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind
    assert io.load_checkpoint(path, model, model.optimizer)["step"] == 1


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch):
    config = tiny_config(data=image_dir, sample_every=2)
    run = str(tmp_path / "run")
    from vq_vae_keras import data

    real = data.ImageFolder.read_batch
    import itertools

    fifth = next(itertools.islice(data.epoch_batches(12, config.batch_size, config.seed), 4, None))

    def poisoned(self, indices):  # batches are read in parallel: pick the 5th by its indices
        batch = real(self, indices)
        if np.array_equal(indices, fifth):  # the 5th training batch carries a NaN
            batch[0, 0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(data.ImageFolder, "read_batch", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 5"):
        train_vqvae(config, run, steps=20)
    vqvae = vqk.build_vqvae(config)
    model = compile_vqvae(vqvae)
    assert io.load_checkpoint(os.path.join(run, "checkpoint", "vqvae.npz"), model, model.optimizer)["step"] == 3
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_prior_resume_ends_with_the_same_weights(image_dir, tmp_path):
    import shutil

    from vq_vae_keras.training import train_prior

    config = tiny_config(data=image_dir, seed=2, prior_batch_size=4)  # 12 training sequences: 3 steps an epoch
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_vqvae(config, straight, steps=3, deterministic=True)
    shutil.copytree(straight, resumed)
    a = train_prior(config, straight, steps=8, deterministic=True)
    train_prior(config, resumed, steps=5, deterministic=True)  # stops inside the second epoch
    b = train_prior(config, resumed, steps=8, resume=True)
    assert int(b.optimizer.iterations.numpy()) == 8
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    with open(os.path.join(resumed, "prior_log.csv")) as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["3", "5", "6", "8"]  # 5: where the first session ended


def test_cached_images_train_exactly_like_files(image_dir, tmp_path):
    config = tiny_config(data=image_dir, seed=3)
    train_vqvae(config, str(tmp_path / "files"), steps=4, deterministic=True)
    train_vqvae(config, str(tmp_path / "cached"), steps=4, cache=str(tmp_path / "images.npz"), deterministic=True)
    a, b = read_log(str(tmp_path / "files")), read_log(str(tmp_path / "cached"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert os.path.isfile(tmp_path / "images.npz")


def event_tags(folder, values=None):
    """{tag: number of events} of every TensorBoard event file under folder; the (step, value)
    pairs of the scalar tags go into `values` if given."""
    import tensorflow as tf

    tags = {}
    for root, _, files in os.walk(folder):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    tags[value.tag] = tags.get(value.tag, 0) + 1
                    if values is not None and value.metadata.plugin_data.plugin_name == "scalars":
                        values.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return tags


def test_tensorboard_holds_scalars_grids_and_code_usage(image_dir, tmp_path):
    run = str(tmp_path / "run")
    config = tiny_config(data=image_dir, sample_every=3)
    train_vqvae(config, run, steps=4, tensorboard=True)
    values = {}
    tags = event_tags(os.path.join(run, "tensorboard", "vqvae"), values)
    for key in ("loss", "mse_x", "mse_e", "mse_z", "perplexity", "usage", "learning_rate"):
        assert tags.get(key) == 4, (key, tags)  # one per step
    rows = read_log(run)
    assert sorted(values["mse_x"]) == [(int(r["step"]), pytest.approx(float(r["mse_x"]), rel=1e-5)) for r in rows]
    np.testing.assert_allclose([v for _, v in values["learning_rate"]], config.lr, rtol=1e-6)
    for key in ("test_ae_1", "test_ae_2", "code_usage", "code_usage_chart"):
        assert tags.get(key) == 2, (key, tags)  # sample steps 1 and 4 (the end)
    from vq_vae_keras.training import train_prior

    config.prior_heads, config.prior_head_dim, config.prior_depth, config.prior_batch_size = 2, 4, 2, 4
    config.val_split = 0.25
    train_prior(config, run, epochs=2, tensorboard=True)
    tags = event_tags(os.path.join(run, "tensorboard", "prior"))
    assert tags.get("loss") == tags.get("accuracy") == tags.get("val_nll") == tags.get("prior_sample") == 2, tags


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_resume_is_exact_in_mixed_precision(image_dir, tmp_path, precision):
    config = tiny_config(data=image_dir, seed=5, sample_every=100, precision=precision)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    a = train_vqvae(config, straight, steps=5, deterministic=True)
    train_vqvae(config, resumed, steps=3, deterministic=True)
    b = train_vqvae(config, resumed, steps=5, resume=True)
    assert [float(r["loss"]) for r in read_log(resumed)] == [float(r["loss"]) for r in read_log(straight)]
    for x, y in zip(a.train_model.get_weights(), b.train_model.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_array_data_user_callbacks_and_no_global_seeding(tmp_path):
    import tensorflow as tf

    from test_fit import Recorder, images

    state = np.random.get_state()[1].copy()
    recorder = Recorder()
    run = str(tmp_path / "run")
    train_vqvae(tiny_config(sample_every=2), run, steps=3, data=images(10), callbacks=[recorder])
    assert np.array_equal(np.random.get_state()[1], state)  # the library did not reseed NumPy globally
    assert len(recorder.batch_logs) == 3 and "mse_x" in recorder.batch_logs[0]
    assert [r["step"] for r in read_log(run)] == ["1", "2", "3"]
    dataset = tf.data.Dataset.from_tensor_slices(images(8)).batch(4)
    train_vqvae(tiny_config(), str(tmp_path / "from_dataset"), steps=3, data=dataset)
    assert len(read_log(str(tmp_path / "from_dataset"))) == 3
    with pytest.raises(vqk.UsageError, match="in \\[-1, 1\\]"):
        train_vqvae(tiny_config(), str(tmp_path / "bad"), steps=1, data=images(4) * 3)


def test_xla_really_compiles_and_the_same_seed_gives_the_same_weights(image_dir, tmp_path, recwarn):
    """Keras quietly drops jit_compile while op determinism is on: a deterministic XLA run must
    not turn it on, and must still repeat exactly."""
    weights = []
    for name in ("a", "b"):
        vqvae = train_vqvae(tiny_config(data=image_dir, seed=3, jit_compile=True), str(tmp_path / name), steps=4,
                            deterministic=True)
        assert vqvae.train_model.jit_compile is True
        weights.append(vqvae.train_model.get_weights())
    assert not [w for w in recwarn if "jit_compile" in str(w.message)]
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_cli_precision_jit_tensorboard_and_prior_flags(image_dir, tmp_path):
    import json

    from conftest import TINY_FLAGS, run_cli

    run = str(tmp_path / "run")
    run_cli("train.py", "vqvae", "--data", image_dir, "--run", run, *TINY_FLAGS, "--steps", "3", "--sample-every", "2",
            "--precision", "mixed_bfloat16", "--jit", "--tensorboard")
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    assert saved["precision"] == "mixed_bfloat16" and saved["jit_compile"] is True
    assert event_tags(os.path.join(run, "tensorboard", "vqvae")).get("test_ae_2") == 2
    config = vqk.Config.load(os.path.join(run, "config.json"))
    config.prior_heads, config.prior_head_dim, config.prior_depth = 2, 4, 2
    config.save(os.path.join(run, "config.json"))
    run_cli("train.py", "prior", "--run", run, "--epochs", "1", "--batch-size", "4", "--val-split", "0.25",
            "--sample-every-epochs", "0", "--tensorboard", "--jit")
    assert vqk.Config.load(os.path.join(run, "config.json")).prior_jit_compile is True
    with open(os.path.join(run, "prior_log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["val_nll"]) > 0
    assert not [p for p in os.listdir(os.path.join(run, "samples")) if p.startswith("prior_sample")]
    assert "val_nll" in event_tags(os.path.join(run, "tensorboard", "prior"))
    bad = run_cli("train.py", "vqvae", "--data", image_dir, "--run", str(tmp_path / "bad"), "--precision", "float8",
                  check=False)
    assert bad.returncode == 2 and "--precision" in bad.stderr and "Traceback" not in bad.stderr


def test_python_api_does_not_overwrite_a_run_unless_asked(image_dir, tmp_path):
    from vq_vae_keras.errors import UsageError

    run = str(tmp_path / "run")
    train_vqvae(tiny_config(data=image_dir), run, steps=1)
    before = {name: open(os.path.join(run, name), "rb").read() for name in ("config.json", "log.csv")}
    with pytest.raises(UsageError, match="already holds a run"):
        train_vqvae(tiny_config(data=image_dir, lr=3e-3), run, steps=1)
    assert {name: open(os.path.join(run, name), "rb").read() for name in before} == before
    train_vqvae(tiny_config(data=image_dir, lr=3e-3), run, steps=1, overwrite=True)
    assert vqk.Config.load(os.path.join(run, "config.json")).lr == 3e-3


def test_prior_after_an_array_run_trains_on_those_images_not_a_folder_the_config_named(image_dir, tmp_path):
    """config.data named a folder before; the VQ-VAE trained on an array. The run must not claim
    that folder, and the prior must not encode it: it needs the images, and learns their codes."""
    from test_fit import images

    from vq_vae_keras.training import train_prior

    pictures = images(10)
    run = str(tmp_path / "run")
    config = tiny_config(data=image_dir, sample_every=100, sample_every_epochs=0)
    train_vqvae(config, run, steps=2, data=pictures)
    assert vqk.Config.load(os.path.join(run, "config.json")).data is None
    with pytest.raises(vqk.UsageError, match="data=") as error:
        train_prior(config, run, steps=1)
    assert "--data" not in str(error.value).split("(")[0]  # an API error speaks of data=, the flag only aside
    train_prior(config, run, steps=2, data=pictures)
    codes = np.load(os.path.join(run, "codes.npy"))
    loaded = vqk.load_run(run)
    expected = loaded.vqvae.quantize(loaded.vqvae.encode(pictures))[0]
    np.testing.assert_array_equal(codes, expected)


def test_a_strategy_turns_xla_off_from_python_as_from_the_cli(image_dir, tmp_path):
    """One rule for the API and train.py: a Config asking for XLA trains under a strategy, without XLA."""
    config = tiny_config(data=image_dir, sample_every=100, jit_compile=True)
    vqvae = train_vqvae(config, str(tmp_path / "run"), steps=2, strategy=vqk.make_strategy("mirrored"))
    assert vqvae.train_model.jit_compile is False
    assert vqk.Config.load(str(tmp_path / "run" / "config.json")).jit_compile is False


def test_resume_past_the_steps_asked_for_changes_nothing(image_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    config = tiny_config(data=image_dir, sample_every=2)
    train_vqvae(config, run, steps=4)
    before = {name: os.stat(os.path.join(run, name)).st_mtime_ns for name in os.listdir(run)
              if os.path.isfile(os.path.join(run, name))}
    capsys.readouterr()
    train_vqvae(vqk.Config.load(os.path.join(run, "config.json")), run, steps=2, resume=True)
    out = capsys.readouterr().out
    assert "already at step 4, past the 2 asked for" in out and "resuming" not in out
    after = {name: os.stat(os.path.join(run, name)).st_mtime_ns for name in before}
    assert after == before
    assert [r["step"] for r in read_log(run)] == ["1", "2", "3", "4"]


def test_code_usage_after_a_resume_counts_from_the_sample_step_not_the_resume_point(image_dir, tmp_path, capsys):
    """Stopped between sample steps, a run keeps the window's code counts in its checkpoint: the
    resumed usage column and the closing summary are those of a run that never stopped."""
    config = tiny_config(data=image_dir, seed=2, num_codes=64, sample_every=4)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_vqvae(config, straight, steps=8, deterministic=True)
    summary_straight = capsys.readouterr().out.strip().splitlines()[-1]
    train_vqvae(config, resumed, steps=6, deterministic=True)  # saved at 5 (a sample step) and at 6
    capsys.readouterr()
    train_vqvae(config, resumed, steps=8, resume=True)
    summary_resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("codebook")][-1]
    a, b = read_log(straight), read_log(resumed)
    assert [r["usage"] for r in b] == [r["usage"] for r in a]
    assert float(a[6]["usage"]) > float(a[5]["usage"])  # the window grows, so counting anew at 7 would show
    assert summary_resumed.startswith("codebook, steps 6-8:") and summary_resumed == summary_straight


def test_predicting_with_many_models_does_not_warn_of_retracing(retracing_warnings):
    """TensorFlow counts traces per Python function, and every Keras model's predict step is the
    same one: the Python path (train_vqvae, then train_prior encoding with a reloaded run) predicts
    with more than five models and got TensorFlow's "excessive retracing" warning, although each
    model traced once. predict_whole_batches, which all the package's predictions go through,
    keeps it out; plain model.predict on as many models still gets it (so the check can fire)."""
    import keras

    from vq_vae_keras.models import predict_whole_batches

    x = np.zeros((4, 3), np.float32)

    def count(predict):
        retracing_warnings()
        for _ in range(8):
            predict(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
        return retracing_warnings()

    assert count(lambda model: model.predict(x, batch_size=4, verbose=0)) > 0
    assert count(lambda model: predict_whole_batches(model, x, 4)) == 0
