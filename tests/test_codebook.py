"""Codebook health: usage metrics, EMA updates, dead-code restarts, k-means init, Gumbel-softmax."""

import os

import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.codebook import kmeans, summary, usage_counts
from vq_vae_keras.quantizers import CodeUsage, GumbelQuantizer

from conftest import TINY_FLAGS, run_cli, tiny_config


def test_usage_metric_against_numpy():
    codes = np.array([[0, 3, 3], [5, 0, 3]])
    metric = CodeUsage(8)
    metric.update_state(codes)
    metric.update_state(np.array([7]))
    counts = np.bincount(np.append(codes.ravel(), 7), minlength=8)
    np.testing.assert_array_equal(metric.counts.numpy(), counts)
    np.testing.assert_allclose(float(metric.result()), (counts > 0).mean())
    assert summary(usage_counts(codes, 8)) == "3 of 8 codes used, perplexity 2.7, most used code 3 at 50.0%"  # exp(H(1/3, 1/2, 1/6)) = 2.75


def _ema_layer(num_codes=4, dim=3, decay=0.9, eps=1e-5, restart_dead=0):
    layer = vqk.VectorQuantizer(num_codes, ema_decay=decay, ema_epsilon=eps, restart_dead=restart_dead, seed=0)
    layer.build((None, dim))
    layer.initialise(np.array([[0, 0, 0], [1, 1, 1], [5, 5, 5], [-3, 0, 3]], np.float32)[:num_codes])
    return layer


def test_ema_update_equals_the_formula_in_numpy():
    layer = _ema_layer()
    z = np.array([[0.1, 0, 0], [0.2, 0.1, 0], [1.2, 0.9, 1], [4, 5, 6], [0.9, 1, 1.3]], np.float32)
    counts, sums = layer.ema_counts.numpy().copy(), layer.ema_sums.numpy().copy()
    codes, vectors = (np.asarray(t) for t in layer(z, training=True))
    # By hand: nearest codes, then N <- d N + (1-d) n, m <- d m + (1-d) sum z, e = m / Laplace(N).
    np.testing.assert_array_equal(codes, [0, 0, 1, 2, 1])
    onehot = np.eye(4)[codes]
    counts = 0.9 * counts + 0.1 * onehot.sum(0)
    sums = 0.9 * sums + 0.1 * onehot.T @ z
    total = counts.sum()
    smoothed = (counts + 1e-5) / (total + 4 * 1e-5) * total
    np.testing.assert_allclose(layer.ema_counts.numpy(), counts, rtol=1e-6)
    np.testing.assert_allclose(layer.ema_sums.numpy(), sums, rtol=1e-6)
    np.testing.assert_allclose(layer.codebook.numpy(), sums / smoothed[:, None], rtol=1e-5)
    np.testing.assert_allclose(vectors, [[0, 0, 0], [0, 0, 0], [1, 1, 1], [5, 5, 5], [1, 1, 1]])  # old codebook
    assert not layer.trainable_weights  # no gradient moves the codebook
    # The unused code 3 keeps its place (its averages decay together).
    np.testing.assert_allclose(layer.codebook.numpy()[3], [-3, 0, 3], rtol=1e-4)


def test_ema_does_nothing_outside_training():
    layer = _ema_layer()
    before = [w.numpy().copy() for w in layer.weights]
    layer(np.ones((6, 3), np.float32), training=False)
    for w, b in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_is_restarted_after_n_steps_and_a_used_one_is_not(ema):
    layer = vqk.VectorQuantizer(4, ema_decay=0.9 if ema else None, restart_dead=3, seed=0)
    layer.build((None, 3))
    layer.initialise(np.array([[0, 0, 0], [1, 1, 1], [50, 50, 50], [-50, 0, 0]], np.float32))
    z = np.array([[0.1, 0, 0], [1, 1, 0.9], [0, 0.1, 0], [1.1, 1, 1]], np.float32)  # only codes 0, 1 used
    for step in range(1, 4):
        before = layer.codebook.numpy().copy()
        layer(z, training=True)
        after = layer.codebook.numpy()
        if step < 3:  # codes 2 and 3 idle for 1, 2 steps: not yet (EMA's smoothing moves them by ~1e-6)
            np.testing.assert_allclose(after[2:], before[2:], rtol=1e-5)
    # After 3 idle steps codes 2 and 3 sit on encoder outputs of the batch; 0 and 1 were never moved there.
    for k in (2, 3):
        assert np.isclose(after[k], z).all(1).any(), after[k]
    np.testing.assert_array_equal(layer.idle_steps.numpy(), [0, 0, 0, 0])
    assert np.abs(after[0]).max() < 0.2 and np.abs(after[1] - 1).max() < 0.2
    if ema:  # the moved code's averages restart at its new place
        np.testing.assert_allclose(layer.ema_sums.numpy()[2:], after[2:])


def test_kmeans_gives_codes_that_each_own_a_vector():
    rng = np.random.default_rng(0)
    # Two tight blobs and a few outliers: naive k-means leaves clusters empty here.
    points = np.concatenate([rng.normal(0, 0.01, (300, 4)), rng.normal(5, 0.01, (300, 4)), rng.normal(0, 9, (5, 4))])
    centroids = kmeans(points, 16, seed=1)
    owners = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert sorted(set(owners)) == list(range(16))
    with pytest.raises(ValueError):
        kmeans(np.zeros((100, 4)), 16)


def test_kmeans_init_through_training(tmp_path):
    from vq_vae_keras.data import ImageFolder, epoch_batches
    from vq_vae_keras.training import kmeans_initialise

    from conftest import write_images

    config = tiny_config(data=write_images(tmp_path / "images", count=12), kmeans_init=True, batch_size=8)
    vqvae = vqk.build_vqvae(config)
    folder = ImageFolder(config.data, config.img_dim)
    moving = [v.numpy().copy() for v in vqvae.encoder.non_trainable_variables]
    kmeans_initialise(vqvae, folder, config)
    for v, m in zip(vqvae.encoder.non_trainable_variables, moving):
        np.testing.assert_array_equal(v.numpy(), m)  # BatchNorm statistics untouched
    first = folder.read_batch(next(epoch_batches(len(folder), 8, config.seed)))  # 128 vectors: enough alone
    z = vqvae.encoder(first, training=True).numpy()
    codes = vqvae.vq_layer(z)[0].numpy()
    assert len(np.unique(codes)) == config.num_codes  # every code owns some of the batch's vectors


def test_gumbel_soft_codes_sum_to_one_and_hard_codes_are_the_argmax():
    layer = GumbelQuantizer(5, seed=0)
    layer.build((None, 5))
    layer.codebook.assign(np.eye(5, dtype=np.float32))  # code vectors = the soft weights themselves
    z = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    _, soft = layer(z, training=True)
    np.testing.assert_allclose(soft.numpy().sum(-1), 1, rtol=1e-5)
    assert soft.numpy().max(-1).min() < 0.999  # soft at temperature 1
    logits = z @ layer.logit_kernel.numpy() + layer.logit_bias.numpy()
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = (q * np.log(q * 5)).sum(-1).mean()  # KL(q || uniform), added with its weight
    np.testing.assert_allclose(float(layer.losses[0]), layer.kl_weight * kl, rtol=1e-4)
    codes, vectors = layer(z, training=False)
    np.testing.assert_array_equal(codes.numpy(), logits.argmax(-1))
    np.testing.assert_array_equal(vectors.numpy(), np.eye(5)[logits.argmax(-1)])


def test_gumbel_gradient_reaches_the_encoder():
    vqvae = vqk.build_vqvae(tiny_config(quantizer="gumbel"))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(vqvae.train_model(x, training=True) - x))
    grads = tape.gradient(loss, vqvae.encoder.trainable_weights + [vqvae.vq_layer.codebook, vqvae.vq_layer.logit_kernel])
    assert all(g is not None and np.abs(tf.convert_to_tensor(g).numpy()).max() > 0 for g in grads)


def test_temperature_schedules():
    for schedule in ("cosine", "linear", "exponential"):
        config = vqk.Config(quantizer="gumbel", gumbel_schedule=schedule, gumbel_anneal_steps=100)
        values = [config.gumbel_temperature_at(s) for s in (0, 50, 100, 1000)]
        assert values[0] == 1.0 and values[2] == values[3] == pytest.approx(1 / 16)
        assert 1 / 16 < values[1] < 1
    assert vqk.Config(gumbel_anneal_steps=100).gumbel_temperature_at(50) == pytest.approx((1 + 1 / 16) / 2)


OPTIONS = {
    "ema": ["--quantizer", "ema"],
    "restart-dead": ["--restart-dead", "2"],
    "kmeans-init": ["--kmeans-init"],
    "gumbel": ["--quantizer", "gumbel", "--gumbel-anneal-steps", "4", "--gumbel-schedule", "linear"],
}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_end_to_end_and_reloads(option, tmp_path):
    from conftest import write_images

    data = write_images(tmp_path / "images", count=8)
    run = str(tmp_path / "run")
    result = run_cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "6",
                     "--sample-every", "3", *OPTIONS[option])
    assert "codebook, steps" in result.stdout + result.stderr
    config = vqk.Config.load(os.path.join(run, "config.json"))
    loaded = vqk.load_run(run)  # strict: fails unless the same quantizer was rebuilt
    layer = loaded.vqvae.vq_layer
    import keras

    whole = keras.saving.load_model(os.path.join(run, "vqvae.keras"))  # safe mode: registered layers only
    x = vqk.load_images(data, 16)[:2]
    np.testing.assert_allclose(whole(x, training=False), loaded.vqvae.train_model(x, training=False), atol=1e-6)
    if option == "gumbel":
        assert config.quantizer == "gumbel" and isinstance(layer, GumbelQuantizer)
        header = open(os.path.join(run, "log.csv")).readline().strip().split(",")
        assert {"kl", "temperature"} <= set(header)
        last = open(os.path.join(run, "log.csv")).read().splitlines()[-1].split(",")
        assert float(last[header.index("temperature")]) == pytest.approx(1 / 16)
    elif option == "ema":
        assert config.quantizer == "ema" and layer.ema_decay == 0.99
    elif option == "restart-dead":
        assert config.restart_dead == 2 and layer.restart_dead == 2
    else:
        assert config.kmeans_init
    result = run_cli("sample.py", "usage", "--run", run, "--data", data)
    assert "codes used" in result.stdout and os.path.isfile(os.path.join(run, "samples", "usage.png"))


def test_options_that_do_not_apply_are_errors(tmp_path):
    from conftest import write_images

    data = write_images(tmp_path / "images", count=4)
    for flags in (["--gumbel-kl-weight", "0.1"], ["--quantizer", "gumbel", "--restart-dead", "3"],
                  ["--quantizer", "ema", "--ema-decay", "1.5"]):
        result = run_cli("train.py", "vqvae", "--data", data, "--run", str(tmp_path / "r"), *flags, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
