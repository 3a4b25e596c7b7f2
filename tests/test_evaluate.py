"""Evaluation: PSNR/SSIM, usage, bits per dim and FID against independent NumPy computations;
`sample.py evaluate` end to end; the EvaluateEvery callback under a plain fit."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.evaluation import (KEYS, PSNR_CAP, InceptionFeatures, feature_statistics, frechet_distance,
                                   reconstruction_scores)
from vq_vae_keras.io import to_uint8
from vq_vae_keras.run import LoadedRun

from conftest import run_cli, tiny_config, write_images


# ----------------------------------------------------------------------------- independent NumPy

def numpy_psnr(a, b):
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * math.log10(255 ** 2 / err)


def numpy_ssim(a, b):
    """SSIM of two (d, d, 3) images written out from Wang et al. 2004: Gaussian 11x11 window, sigma
    1.5, valid positions only, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2; mean over positions and channels."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def local_mean(x):
        patches = np.lib.stride_tricks.sliding_window_view(x, (11, 11), axis=(0, 1))  # (d-10, d-10, 3, 11, 11)
        return (patches * window).sum(axis=(-2, -1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a ** 2, local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def photo_like(rng, n, d):
    """Smooth structure plus texture, uint8 (n, d, d, 3)."""
    t = np.linspace(0, 1, d)
    base = 128 + 80 * np.sin(6 * t[:, None, None] + rng.uniform(0, 6, (n, 1, 1, 1, 3))[..., 0, :] * t[None, :, None])
    return np.clip(base + rng.normal(0, 20, (n, d, d, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- PSNR, SSIM

def test_identical_images_psnr_capped_and_ssim_one():
    images = photo_like(np.random.default_rng(0), 3, 32)
    scores = reconstruction_scores(images, images.copy())
    np.testing.assert_array_equal(scores["mse"], 0.0)
    np.testing.assert_array_equal(scores["psnr"], PSNR_CAP)  # finite: the mean stays finite
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-6)


def test_psnr_of_noise_with_known_variance():
    rng = np.random.default_rng(1)
    grey = np.full((4, 128, 128, 3), 128, np.uint8)
    # every pixel-channel off by exactly k: MSE = k^2, PSNR = 20 log10(255 / k)
    k = 5
    signs = rng.choice([-1, 1], grey.shape)
    scores = reconstruction_scores(grey, (grey + k * signs).astype(np.uint8))
    np.testing.assert_allclose(scores["mse"], k ** 2)
    np.testing.assert_allclose(scores["psnr"], 20 * math.log10(255 / k))
    # uniform integer noise in [-k, k]: variance k (k + 1) / 3
    noisy = (grey + rng.integers(-k, k + 1, grey.shape)).astype(np.uint8)
    expected = 10 * math.log10(255 ** 2 / (k * (k + 1) / 3))
    np.testing.assert_allclose(reconstruction_scores(grey, noisy)["psnr"], expected, atol=0.1)  # ~6 sigma


def test_psnr_and_ssim_match_numpy():
    rng = np.random.default_rng(2)
    a = photo_like(rng, 3, 40)
    b = np.clip(a + rng.normal(0, 15, a.shape) + 10, 0, 255).astype(np.uint8)
    scores = reconstruction_scores(a, b)
    np.testing.assert_allclose(scores["psnr"], [numpy_psnr(x, y) for x, y in zip(a, b)], rtol=1e-10)
    np.testing.assert_allclose(scores["ssim"], [numpy_ssim(x, y) for x, y in zip(a, b)], atol=2e-5)
    assert 0.2 < scores["ssim"].min() < scores["ssim"].max() < 0.99  # a real, non-trivial range


# ----------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(3).normal(size=(300, 20)) @ np.random.default_rng(4).normal(size=(20, 20))
    stats = feature_statistics(features)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8 * np.trace(stats[1])


def test_frechet_distance_of_two_gaussians_matches_closed_forms():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 with positive eigenvalues
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance([0.0, 0.0], s1, [0.5, 0.0], s2) == pytest.approx(expected, rel=1e-12)


def test_missing_imagenet_download_is_a_usage_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(vqk.UsageError, match="--inception-weights"):
        InceptionFeatures("imagenet")
    with pytest.raises(vqk.UsageError, match="no Inception weights file"):
        InceptionFeatures("/no/such/file.h5")


def test_other_inception_failures_are_not_called_a_missing_download(monkeypatch, tmp_path):
    """Only the download is reported as "cannot get the weights"; a bug elsewhere stays itself."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in building the model")

    monkeypatch.setattr(keras.utils, "get_file", lambda *args, **kwargs: str(tmp_path / "weights.h5"))
    monkeypatch.setattr(keras.applications, "InceptionV3", broken)
    with pytest.raises(RuntimeError, match="a bug in building the model"):
        InceptionFeatures("imagenet")
    monkeypatch.undo()
    damaged = tmp_path / "inception.h5"
    damaged.write_bytes(b"not an HDF5 file")
    with pytest.raises(vqk.UsageError, match="cannot load Inception weights from"):
        InceptionFeatures(str(damaged))


# ----------------------------------------------------------------------------- evaluate() on a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    keras.utils.set_random_seed(0)
    config = tiny_config(num_codes=16)
    vqvae = vqk.build_vqvae(config)
    images = vqk.load_images(write_images(tmp_path_factory.mktemp("eval") / "images", count=10), config.img_dim)
    return LoadedRun(config, vqvae, None), images


def test_evaluate_matches_numpy_on_the_production_path(tiny_run):
    run, images = tiny_run
    results = vqk.evaluate(run, images, batch_size=3, progress=False)  # batches of 3, 3, 3, 1
    assert set(results) == set(KEYS) and results["images"] == 10
    original = to_uint8(images)
    for quantize, suffix in ((True, ""), (False, "_unquantized")):
        recon = to_uint8(run.vqvae.reconstruct(images, quantize=quantize))
        assert results["psnr" + suffix] == pytest.approx(np.mean([numpy_psnr(a, b) for a, b in zip(original, recon)]))
        assert results["ssim" + suffix] == pytest.approx(np.mean([numpy_ssim(a, b) for a, b in zip(original, recon)]),
                                                         abs=2e-5)
    codes = run.vqvae.quantize(run.vqvae.encode(images))[0]
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    assert results["codes_used"] == len(counts)
    assert results["codes_used_fraction"] == pytest.approx(len(counts) / 16)
    assert results["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert results["prior_nll"] is None and results["fid"] is None


def table_prior(table):
    """A stand-in prior whose next-code probabilities are table[position, previous token]: an
    off-by-one between the prior's outputs and the codes they score picks other entries."""
    length, tokens, num_codes = table.shape
    inputs = keras.Input((length,), dtype="int32")
    index = keras.layers.Lambda(lambda t: t + keras.ops.arange(length, dtype="int32")[None] * tokens,
                                output_shape=(length,))(inputs)
    embed = keras.layers.Embedding(length * tokens, num_codes)
    outputs = keras.layers.Softmax()(embed(index))
    model = keras.Model(inputs, outputs)
    embed.set_weights([np.log(table.reshape(length * tokens, num_codes))])
    return model


def test_prior_bits_per_dim_by_hand(tiny_run):
    run, images = tiny_run
    h, w = run.config.grid_shape
    table = np.random.default_rng(5).dirichlet(np.ones(16), size=(h * w, 17)).astype(np.float32)
    results = vqk.evaluate(LoadedRun(run.config, run.vqvae, table_prior(table)), images, batch_size=4, progress=False)

    codes = run.vqvae.quantize(run.vqvae.encode(images))[0].reshape(len(images), h * w)  # (10, 16), raster order
    per_image_nats = np.zeros(len(images))
    for n, row in enumerate(codes):
        previous = 0  # the start token
        for position, code in enumerate(row):
            per_image_nats[n] -= math.log(table[position, previous, code])
            previous = code + 1  # code k is token k + 1
    assert results["prior_nll"] == pytest.approx(per_image_nats.sum() / codes.size, rel=1e-5)
    bits_per_dim = per_image_nats / (16 * 16 * 3) / math.log(2)  # img_dim 16, 3 channels
    assert results["prior_bits_per_dim"] == pytest.approx(bits_per_dim.mean(), rel=1e-5)


def test_evaluate_rejects_bad_arguments(tiny_run):
    run, images = tiny_run
    with pytest.raises(vqk.UsageError, match="shape"):
        vqk.evaluate(run, images[:, :8], progress=False)
    with pytest.raises(vqk.UsageError, match="FID samples"):
        vqk.evaluate(run, images, fid=1, progress=False)
    for bad in (0, 1.5, True, float("nan")):
        with pytest.raises(vqk.UsageError, match="batch size"):
            vqk.evaluate(run, images, batch_size=bad, progress=False)
    with pytest.raises(vqk.UsageError, match="FID samples"):
        vqk.evaluate(run, images, fid=True, progress=False)
    for bad in (-1, 1.5, float("nan"), 2 ** 31, "0"):
        with pytest.raises(vqk.UsageError, match="seed must be an integer"):
            vqk.evaluate(run, images, seed=bad, progress=False)
    with pytest.raises(vqk.UsageError, match="inception_weights must be"):
        vqk.evaluate(run, images, fid=2, inception_weights=3, progress=False)
    with pytest.raises(vqk.UsageError, match="run must be a run directory"):
        vqk.evaluate(42, images, progress=False)
    with pytest.raises(vqk.UsageError, match="images must be a folder or an array of floats"):
        vqk.evaluate(run, [["a.png"]], progress=False)
    with pytest.raises(vqk.UsageError, match=r"finite floats in \[-1, 1\]"):
        vqk.evaluate(run, images * np.nan, progress=False)
    with pytest.raises(vqk.UsageError, match=r"finite floats in \[-1, 1\]"):
        vqk.evaluate(run, images * 255, progress=False)


class FakeInception:
    """Stands in for InceptionV3 (slow to build): features that tell images apart."""

    def __init__(self, weights="imagenet", batch_size=32):
        pass

    def __call__(self, pixels):
        return np.asarray(pixels, np.float64).reshape(len(pixels), -1)[:, :8]


@pytest.mark.parametrize("weights, features", [("none", "random"), (None, "random"), ("imagenet", "imagenet")])
def test_fids_of_random_features_are_labelled_not_comparable(tiny_run, monkeypatch, weights, features):
    from vq_vae_keras import evaluation

    run, images = tiny_run
    monkeypatch.setattr(evaluation, "InceptionFeatures", FakeInception)
    results = vqk.evaluate(run, images, fid=2, inception_weights=weights, progress=False)
    assert set(results) == set(KEYS) and results["rfid"] is not None
    assert results["fid_features"] == features
    table = evaluation.format_table(results)
    lines = {line.split()[0]: line for line in table.splitlines()}
    if features == "random":
        assert "not comparable" in results["fid_note"]
        assert "NOT COMPARABLE" in lines["rfid"] and lines["fid_features"].split()[1] == "random"
        assert table.splitlines()[-1].startswith("note: random Inception weights")
    else:
        assert results["fid_note"] is None and "NOT COMPARABLE" not in table and "note:" not in table
    assert vqk.evaluate(run, images, progress=False)["fid_features"] is None


def test_evaluate_folder_of_undecodable_images_is_a_usage_error(tiny_run, tmp_path):
    run, _ = tiny_run
    folder = write_images(tmp_path / "broken", count=2)
    for name in os.listdir(folder):  # the header survives (so the file is listed), the pixels do not
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            head = f.read(60)
        with open(path, "wb") as f:
            f.write(head)
    with pytest.raises(vqk.UsageError, match="no readable images"):
        vqk.evaluate(run, folder, progress=False)


# ----------------------------------------------------------------------------- the command line

@pytest.mark.slow
def test_cli_evaluate_writes_every_key_with_fid(trained_run, tmp_path):
    run, data = trained_run["run"], write_images(tmp_path / "held_out", count=5, seed=7)  # few: Inception is slow
    result = run_cli("sample.py", "evaluate", "--run", run, "--data", data, "--batch-size", "3",
                     "--fid", "2", "--inception-weights", "none")
    with open(os.path.join(run, "eval.json")) as f:
        results = json.load(f)
    assert list(results) == list(KEYS)
    top = [key for key in KEYS if key.endswith("_top")]  # a two-level run's only
    assert all(results[key] is not None for key in KEYS if key not in top), results
    assert top and all(results[key] is None for key in top), results
    assert results["images"] == 5 and results["codes_used"] <= 8
    assert 0 <= results["ssim"] <= 1 and results["psnr"] > 0 and results["rfid"] >= 0 and results["fid"] >= 0
    assert "prior_bits_per_dim" in result.stdout and result.stdout.strip().endswith("eval.json")
    assert results["fid_features"] == "random" and "not comparable" in results["fid_note"]
    assert "NOT COMPARABLE" in result.stdout
    # the Python API gives the same numbers from the run directory
    again = vqk.evaluate(run, data, batch_size=5, progress=False)
    for key in ("psnr", "ssim", "mse", "psnr_unquantized", "codes_used", "perplexity", "prior_nll"):
        assert again[key] == pytest.approx(results[key], rel=1e-5), key


def evaluate_argv(trained_run, tmp_path, args):
    flags = {"--run": trained_run["run"], "--data": trained_run["data"]}
    flags.update(dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]))))
    return ["evaluate", *[x for pair in flags.items() for x in pair]]


# The other bad inputs of `sample.py evaluate` are rows of tests/test_bad_inputs.py.
def test_cli_evaluate_bad_input_in_a_fresh_process(trained_run, tmp_path):
    result = run_cli("sample.py", *evaluate_argv(trained_run, tmp_path, ["--json", "{tmp}"]), check=False)
    assert result.returncode == 2 and "is a folder" in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- during training

def test_evaluate_every_under_a_plain_fit(tiny_run, tmp_path):
    run, images = tiny_run
    config = run.config
    vqvae = vqk.build_vqvae(config)
    vqvae.train_model.compile(optimizer="adam")  # the model owns its loss
    log, board = str(tmp_path / "eval_log.csv"), str(tmp_path / "tb")
    callback = vqk.EvaluateEvery(vqvae, images[:6], every=2, csv_path=log, tensorboard_dir=board)
    vqvae.train_model.fit(images, batch_size=4, epochs=2, verbose=0, callbacks=[callback])  # 3 steps/epoch

    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # the last is also the end of training
    final = vqk.evaluate(LoadedRun(config, vqvae, None), images[:6], progress=False)
    assert float(rows[-1]["psnr"]) == pytest.approx(final["psnr"])
    assert float(rows[-1]["ssim"]) == pytest.approx(final["ssim"])
    assert int(rows[-1]["codes_used"]) == final["codes_used"]
    scalars = {}  # the TensorBoard event file, read back
    for name in os.listdir(board):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(board, name)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                scalars[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    assert scalars[("eval/psnr", 6)] == pytest.approx(final["psnr"], rel=1e-6)
    assert scalars[("eval/codes_used", 4)] == float(rows[1]["codes_used"])

    # a resumed run keeps the rows up to its step, drops later ones, and evaluates at its end
    resumed = vqk.EvaluateEvery(vqvae, images[:6], every=5, csv_path=log, initial_step=4)
    vqvae.train_model.fit(images[:4], images[:4], batch_size=4, epochs=1, verbose=0, callbacks=[resumed])
    with open(log, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 5]
