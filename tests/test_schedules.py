"""Learning-rate schedules: the rate at each step against the formula, the same rates after a
resume (in-process, and after a kill -9), the reference's constant Adam 1e-3 by default."""

import csv
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras.models import compile_vqvae, learning_rate, log_names
from vq_vae_keras.priors import compile_prior
from vq_vae_keras.training import train_prior, train_vqvae

from conftest import ROOT, TINY_FLAGS, run_cli, tiny_config, write_images


def expected_lr(step, lr, warmup, total, ratio=0.0, cosine=True):
    """The rate of the update made at optimizer iteration `step`, written out: linear from 0 over
    the warm-up, then lr, or a half cosine from lr to lr * ratio at `total` (held after it)."""
    if step < warmup:
        return lr * step / warmup
    if not cosine:
        return lr
    done = min(step - warmup, total - warmup) / (total - warmup)
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + np.cos(np.pi * done)))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def applied_rates(rate, steps):
    """The step Adam takes at each of `steps` iterations on a constant gradient of 1, which is its
    learning rate (m_hat / sqrt(v_hat) = 1, up to epsilon)."""
    optimizer = keras.optimizers.Adam(rate, epsilon=1e-12)
    weight = keras.Variable(np.zeros(1))  # float64: the moves stay exact as the weight grows
    moves = []
    for _ in range(steps):
        before = float(weight.numpy()[0])
        optimizer.apply([keras.ops.ones(1, "float64")], [weight])
        moves.append(before - float(weight.numpy()[0]))
    return np.array(moves)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_rate_adam_applies_follows_the_formula(schedule):
    lr, warmup, total, ratio = 2e-3, 10, 50, 0.1 if schedule == "cosine" else 0.0
    config = tiny_config(lr=lr, lr_schedule=schedule, warmup_steps=warmup, lr_min_ratio=ratio)
    rate = learning_rate(config, total)
    expected = [expected_lr(s, lr, warmup, total, ratio, schedule == "cosine") for s in range(total + 5)]
    # chosen steps: the first, mid-warm-up, the warm-up's end, mid-decay, the last, past the end
    for step in (0, 5, 9, 10, 30, 49, 50, 54):
        assert float(rate(step)) == pytest.approx(expected[step], rel=1e-5, abs=1e-12), step
    np.testing.assert_allclose(applied_rates(rate, total + 5), expected, rtol=1e-5, atol=1e-10)


def test_the_priors_fields_make_the_priors_schedule():
    config = tiny_config(prior_lr=3e-3, prior_lr_schedule="cosine", prior_warmup_steps=4, prior_lr_min_ratio=0.5)
    rate = learning_rate(config, 20, prior=True)
    for step in (0, 2, 4, 12, 19, 20):
        assert float(rate(step)) == pytest.approx(expected_lr(step, 3e-3, 4, 20, 0.5), rel=1e-5, abs=1e-12)
    assert learning_rate(config, 20) == config.lr  # the VQ-VAE's fields are still the reference's


def test_defaults_leave_the_optimizer_as_the_reference_had_it():
    config = tiny_config()
    for model in (compile_vqvae(vqk.build_vqvae(config)), compile_prior(vqk.build_prior(config), config)):
        optimizer = model.optimizer
        assert type(optimizer) is keras.optimizers.Adam
        assert optimizer.get_config()["learning_rate"] == np.float32(1e-3)  # a plain number, not a schedule
        optimizer.build(model.trainable_variables)
        assert "learning_rate" in [v.name for v in optimizer.variables]  # as in the checkpoints of earlier runs
    assert "lr" not in log_names(config)
    # a warm-up alone needs no length: user code that calls compile_vqvae(vqvae) still works with it
    compile_vqvae(vqk.build_vqvae(tiny_config(warmup_steps=5)))
    with pytest.raises(vqk.UsageError, match="lr_schedule cosine decays over the run: give its total_steps"):
        compile_vqvae(vqk.build_vqvae(tiny_config(lr_schedule="cosine")))


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_schedule="step"), "lr_schedule must be one of constant, cosine, got 'step'"),
    (dict(prior_lr_schedule="linear"), "prior_lr_schedule must be one of"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(prior_warmup_steps=1.5), "prior_warmup_steps must be an integer"),
    (dict(lr_schedule="cosine", lr_min_ratio=1.0), "lr_min_ratio must be in [0, 1)"),
    (dict(lr_min_ratio=0.1), "lr_min_ratio applies to lr_schedule cosine, not constant"),
    (dict(lr_schedule="cosine", prior_lr_min_ratio=0.1), "prior_lr_min_ratio applies to prior_lr_schedule cosine"),
])
def test_bad_schedules_are_refused_naming_the_field(overrides, message):
    with pytest.raises(vqk.UsageError) as raised:
        tiny_config(**overrides).validate()
    assert message in str(raised.value)
    assert raised.value.field == list(overrides)[-1]  # the field at fault is the last one set


def test_a_warmup_longer_than_the_run_is_refused_before_anything_is_written(image_dir, tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(vqk.UsageError, match="warmup_steps 6 must be fewer than the run's 6 steps"):
        train_vqvae(tiny_config(data=image_dir, warmup_steps=6), run, steps=6)
    assert not os.path.exists(run)


class StopAt(keras.callbacks.Callback):
    """Stops fit after `step` global steps, as Ctrl-C does (the run saves and can resume)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.step:
            self.model.stop_training = True


SCHEDULED = dict(seed=3, sample_every=4, lr=2e-3, lr_schedule="cosine", warmup_steps=3, lr_min_ratio=0.1)


def test_a_resumed_run_trains_at_the_same_rates(image_dir, tmp_path, capsys):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train_vqvae(tiny_config(data=image_dir, **SCHEDULED), straight, steps=12)
    rates = [float(r["lr"]) for r in read_csv(os.path.join(straight, "log.csv"))]
    expected = [expected_lr(step - 1, 2e-3, 3, 12, 0.1) for step in range(1, 13)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-12)  # the log's rate is the step's

    train_vqvae(tiny_config(data=image_dir, **SCHEDULED), stopped, steps=12, callbacks=[StopAt(6)])
    assert len(read_csv(os.path.join(stopped, "log.csv"))) == 6
    train_vqvae(tiny_config(data=image_dir, **SCHEDULED), stopped, resume=True)  # a fresh Config, no steps
    resumed = read_csv(os.path.join(stopped, "log.csv"))
    assert [r["lr"] for r in resumed] == [r["lr"] for r in read_csv(os.path.join(straight, "log.csv"))]
    assert "warning" not in capsys.readouterr().err

    # More steps than the run began with: its schedule stays (one warning line), at its floor after step 12
    train_vqvae(tiny_config(data=image_dir, **SCHEDULED), stopped, steps=15, resume=True)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "keeps the run's cosine schedule, which ends at step 12, not 15" in err
    longer = read_csv(os.path.join(stopped, "log.csv"))
    assert [r["lr"] for r in longer[:12]] == [r["lr"] for r in resumed]
    np.testing.assert_allclose([float(r["lr"]) for r in longer[12:]], 2e-4, rtol=1e-5)

    # From Python, a Config with another rate or schedule is refused naming the field, nothing written
    for changed in ({"lr_schedule": "constant", "lr_min_ratio": 0.0}, {"warmup_steps": 2}, {"lr": 1e-3}):
        before = open(os.path.join(stopped, "config.json")).read()
        with pytest.raises(vqk.UsageError, match=f"{next(iter(changed))} .* differs from the run's") as error:
            train_vqvae(tiny_config(data=image_dir, **{**SCHEDULED, **changed}), stopped, steps=16, resume=True)
        assert error.value.field == next(iter(changed))
        assert open(os.path.join(stopped, "config.json")).read() == before


def test_the_priors_rate_follows_its_epochs_and_resumes(image_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    config = tiny_config(data=image_dir, prior_batch_size=4, prior_lr_schedule="cosine", prior_warmup_steps=2,
                         sample_every_epochs=0)
    train_vqvae(config, run, steps=2)
    train_prior(config, run, epochs=4, callbacks=[StopAt(5)])  # 12 code maps, 3 steps an epoch: 12 steps
    train_prior(config, run, resume=True)
    rows = read_csv(os.path.join(run, "prior_log.csv"))
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]  # one row an epoch, the stop at step 5 between
    rates = [float(r["lr"]) for r in rows]
    np.testing.assert_allclose(rates, [expected_lr(int(r["step"]) - 1, 1e-3, 2, 12) for r in rows], rtol=1e-5)


@pytest.mark.slow
def test_kill_9_and_resume_give_the_uninterrupted_rates(tmp_path):
    data = write_images(tmp_path / "images", count=8)
    flags = [*TINY_FLAGS, "--steps", "60", "--sample-every", "5", "--lr-schedule", "cosine", "--warmup-steps", "10",
             "--lr-min-ratio", "0.05"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_cli("train.py", "vqvae", "--data", data, "--run", straight, *flags)
    proc = subprocess.Popen([sys.executable, "train.py", "vqvae", "--data", data, "--run", killed, *flags],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(killed, "log.csv")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) > 12):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    assert len(read_csv(log)) < 60
    run_cli("train.py", "vqvae", "--run", killed, "--resume")  # a bare --resume: on to the run's step 60
    a, b = read_csv(os.path.join(straight, "log.csv")), read_csv(log)
    assert [r["step"] for r in b] == [str(step) for step in range(1, 61)]
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    np.testing.assert_allclose([float(r["lr"]) for r in a], [expected_lr(s, 1e-3, 10, 60, 0.05) for s in range(60)],
                               rtol=1e-5, atol=1e-12)
