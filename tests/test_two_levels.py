"""VQ-VAE-2 (levels 2): the model's shapes, parameters, loss and gradients against hand-worked
numbers; inference agreeing with the training graph; training, resume, grids, evaluation and
usage through the library and the command line; what is refused on a two-level run."""

import json
import os
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import sample
import train
import vq_vae_keras as vqk
from vq_vae_keras.codebook import kmeans
from vq_vae_keras.data import ImageArray
from vq_vae_keras.errors import UsageError
from vq_vae_keras.grids import interpolation_grid
from vq_vae_keras.io import to_uint8
from vq_vae_keras.models import VQVAEObjective, log_names, metric_names
from vq_vae_keras.priors.sampling import level_seed, sample_codes, sample_levels
from vq_vae_keras.priors.tokens import codes_to_tokens
from vq_vae_keras.training import kmeans_initialise, train_prior, train_vqvae

from conftest import ROOT, TINY_FLAGS, call_main, run_cli, tiny_config, write_images


PRIOR_FLAGS = ["--prior-heads", "2", "--prior-head-dim", "4", "--prior-depth", "2"]
# A small PixelCNN whose last code of a 4-wide map still sees the whole row above (depth * (kernel // 2) >= 3).
PIXELCNN = {"attention": {}, "pixelcnn": dict(prior="pixelcnn", pixelcnn_width=8, pixelcnn_depth=4, pixelcnn_kernel=5)}


def two_level(**overrides):
    return tiny_config(**{"img_dim": 32, "levels": 2, **overrides})


def images(n=8, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


def test_shapes_and_parameter_counts_of_both_levels():
    one, two = vqk.build_vqvae(tiny_config(img_dim=32)), vqk.build_vqvae(two_level(top_num_codes=5))
    z, z_top = (tuple(t.shape[1:]) for t in two.encoder.output)
    assert (z, z_top) == ((8, 8, 8), (4, 4, 8))
    codes, top_codes, vectors, top_vectors = (tuple(t.shape[1:]) for t in two.quantizer.output)
    assert (codes, top_codes, vectors, top_vectors) == ((8, 8), (4, 4), (8, 8, 8), (4, 4, 8))
    assert tuple(two.decoder.output.shape[1:]) == (32, 32, 3)
    # Worked by hand at z_dim 8, one residual block (32 px): conv k x k from a to b channels has
    # k*k*a*b + b parameters, a BatchNorm 4 per channel.
    conv = lambda k, a, b: k * k * a * b + b  # noqa: E731
    bn, block = 4 * 8, conv(3, 8, 8) + 4 * 8 + conv(1, 8, 8)
    top_encoder = conv(4, 8, 8) + bn + block
    bottom_latents = bn + block + conv(4, 8, 8) + conv(1, 16, 8)  # top vectors decoded to h/4, merged
    decoder_extra = conv(4, 8, 8) + conv(3, 16, 8)  # top vectors brought up, both levels merged
    top_codebook = 5 * 8
    assert two.train_model.count_params() - one.train_model.count_params() == \
        top_encoder + bottom_latents + decoder_extra + top_codebook
    assert two.top_vq_layer.num_codes == 5 and two.vq_layer.num_codes == 8


def test_the_objective_sums_both_levels_terms():
    rng = np.random.default_rng(0)
    x, x_rec = rng.normal(size=(2, 16, 16, 3)), rng.normal(size=(2, 16, 16, 3))
    z, e = rng.normal(size=(2, 4, 4, 8)), rng.normal(size=(2, 4, 4, 8))
    z_top, e_top = rng.normal(size=(2, 2, 2, 8)), rng.normal(size=(2, 2, 2, 8))
    objective = VQVAEObjective(beta=0.3, levels=2)
    objective([t.astype("float32") for t in (x, x_rec, z, e, z_top, e_top)])
    expected = np.mean((x - x_rec) ** 2) + 1.3 * np.mean((z - e) ** 2) + 1.3 * np.mean((z_top - e_top) ** 2)
    np.testing.assert_allclose(float(sum(objective.losses)), expected, rtol=1e-5)
    objective.update_metrics()  # JAX: what the training model's compute_loss does with what the call recorded
    assert float(objective.mse_z_top.result()) == pytest.approx(np.mean((z_top - e_top) ** 2), rel=1e-5)


def test_the_reconstruction_trains_the_top_encoder_through_its_quantizer():
    """mse_x alone (no commitment term) must reach the top encoder: the bottom level and the decoder
    see the top vectors with the top quantizer's straight-through estimator, not cut off."""
    vqvae = vqk.build_vqvae(two_level())
    x = tf.constant(images(4))
    top_encoder = vqvae.train_model.get_layer("top_encoder")
    with tf.GradientTape() as tape:
        mse_x = tf.reduce_mean(tf.square(x - vqvae.train_model(x, training=True)))
    grads = tape.gradient(mse_x, top_encoder.trainable_variables)
    assert all(g is not None for g in grads)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 0


@pytest.mark.parametrize("speed", [{}, dict(precision="mixed_bfloat16", jit_compile=True)])
def test_fit_from_user_code_trains_both_levels(speed):
    """compile(optimizer) and fit(images), nothing else: the model owns both levels' loss terms,
    reports each level's metrics, and learns (in float32, and in bfloat16 under XLA)."""
    config = two_level(**speed)
    model = vqk.build_vqvae(config).train_model
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=config.jit_compile)
    history = model.fit(images(8), batch_size=8, epochs=15, verbose=0).history
    assert set(history) == set(metric_names(config))
    assert all(np.isfinite(v).all() for v in history.values())
    assert np.mean(history["mse_x"][-3:]) < 0.8 * np.mean(history["mse_x"][:3])


def test_inference_agrees_with_the_training_graph():
    """encode -> quantize -> decode (the bottom latents from the top level's code vectors) gives
    what the training model computes at inference; codes_to_vectors gives the quantizer's vectors."""
    vqvae = vqk.build_vqvae(two_level(seed=3))
    x = images(6)
    z = vqvae.encode(x, batch_size=4)
    codes, vectors = vqvae.quantize(z, batch_size=4)
    assert [c.dtype for c in codes] == [np.int32, np.int32]
    for level_codes, level_vectors, looked_up in zip(codes, vectors, vqvae.codes_to_vectors(codes)):
        np.testing.assert_allclose(looked_up, level_vectors, atol=1e-6)
    np.testing.assert_allclose(vqvae.decode(vectors, batch_size=4), vqvae.train_model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(vqvae.reconstruct(x, batch_size=4), vqvae.train_model.predict(x, verbose=0), atol=1e-5)


def test_interpolation_starts_and_ends_at_the_reconstructions():
    vqvae = vqk.build_vqvae(two_level(seed=1))
    starts, ends = images(3, seed=1), images(3, seed=2)
    grid = interpolation_grid(vqvae, starts, ends, 3)
    first, last = grid[:, :32], grid[:, -32:]
    np.testing.assert_array_equal(first, to_uint8(vqvae.reconstruct(starts)).reshape(96, 32, 3))
    np.testing.assert_array_equal(last, to_uint8(vqvae.reconstruct(ends)).reshape(96, 32, 3))


def test_kmeans_initialises_the_top_codebook_then_the_bottom_one_on_its_latents():
    config = two_level(kmeans_init=True, batch_size=8, num_codes=6, top_num_codes=4)
    vqvae = vqk.build_vqvae(config)
    folder = ImageArray(images(8))
    kmeans_initialise(vqvae, folder, config)
    first_batch = folder.read_batch(range(8))  # 8 images: every one of them
    z, z_top = (keras.ops.convert_to_numpy(t) for t in vqvae.encoder(first_batch, training=True))
    # The bottom latents as the initialised top codebook gives them: k-means of the bottom's latents
    # before the top's was set would differ.
    for layer, latents in [(vqvae.top_vq_layer, z_top), (vqvae.vq_layer, z)]:
        expected = kmeans(latents.reshape(-1, 8), layer.num_codes, seed=config.seed)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.codebook), expected, atol=1e-5, err_msg=layer.name)
    # The top level has a quarter of the positions: its codes decide how many images are read (all 12
    # here, 48 top vectors for 40 codes, where the bottom's 8 codes would stop at the first batch).
    config = tiny_config(levels=2, kmeans_init=True, top_num_codes=40)
    kmeans_initialise(vqk.build_vqvae(config), ImageArray(images(12, size=16)), config)


@pytest.mark.parametrize("quantizer", ["ema", "gumbel"])  # each level's EMA state, restarts and noise resume
def test_resume_continues_both_levels_exactly(tmp_path, quantizer):
    data = write_images(tmp_path / "images", count=12, size=16)
    options = {"restart_dead": 2} if quantizer == "ema" else {}
    config = lambda: tiny_config(data=data, seed=4, levels=2, quantizer=quantizer, sample_every=3, **options)  # noqa: E731
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    a = train_vqvae(config(), straight, steps=7, deterministic=True)
    train_vqvae(config(), resumed, steps=5, deterministic=True)
    b = train_vqvae(config(), resumed, steps=7, resume=True)
    log = lambda run: open(os.path.join(run, "log.csv")).read().splitlines()  # noqa: E731
    assert log(straight)[0].split(",")[2:] == log_names(config())
    assert log(resumed) == log(straight)
    for x, y in zip(a.train_model.variables, b.train_model.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


@pytest.mark.slow  # half a minute: several commands on a tiny run
def test_a_two_level_run_through_the_command_line(tmp_path):
    data = write_images(tmp_path / "images", count=10, size=16)
    run = str(tmp_path / "run")
    run_cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--levels", "2", "--top-num-codes", "4",
            "--steps", "4", "--sample-every", "2")
    config = vqk.Config.load(os.path.join(run, "config.json"))
    assert (config.levels, config.top_num_codes, config.top_grid_shape) == (2, 4, (2, 2))
    header = open(os.path.join(run, "log.csv")).readline().strip().split(",")
    assert {"mse_e_top", "mse_z_top", "perplexity_top", "usage_top"} <= set(header)

    # Loaded from the weights in this process, as the .keras file the training process wrote.
    loaded = vqk.load_run(run)
    assert loaded.prior is None and loaded.vqvae.top_vq_layer.num_codes == 4
    x = images(4, size=16)
    whole = keras.saving.load_model(os.path.join(run, "vqvae.keras"))
    np.testing.assert_allclose(loaded.vqvae.train_model.predict(x, verbose=0), whole.predict(x, verbose=0), atol=1e-6)

    for command in ("recon", "interp"):
        status, out, err = call_main(sample.main, [command, "--run", run, "--data", data, "--n", "2", "--seed", "0"])
        assert status == 0, err
    status, out, err = call_main(sample.main, ["usage", "--run", run, "--data", data])
    assert status == 0, err
    assert "top level: 40 code positions" in out  # 10 images of 2x2 top codes
    assert os.path.isfile(os.path.join(run, "samples", "usage_top.png"))
    status, out, err = call_main(sample.main, ["evaluate", "--run", run, "--data", data])
    assert status == 0, err
    results = json.load(open(os.path.join(run, "eval.json")))
    top_codes = loaded.vqvae.quantize(loaded.vqvae.encode(vqk.load_images(data, 16)))[0][1]
    assert results["codes_used_top"] == len(np.unique(top_codes))
    assert results["perplexity_top"] is not None and results["prior_nll"] is None

    # The priors: the bottom one needs the top one; then both, and samples in a fresh process.
    status, _, err = call_main(train.main, ["prior", "--run", run, "--level", "bottom", "--steps", "2"])
    assert status == 2 and err.count("\n") == 1 and "has no top prior" in err, err
    status, _, err = call_main(sample.main, ["random", "--run", run])
    assert status == 2 and err.count("\n") == 1 and "no trained top prior" in err, err
    run_cli("train.py", "prior", "--run", run, "--steps", "3", "--batch-size", "4", *PRIOR_FLAGS)
    assert {"codes_top.npy", "codes_bottom.npy", "prior_top.weights.h5", "prior_bottom.weights.h5",
            "prior_log_top.csv", "prior_log_bottom.csv"} <= set(os.listdir(run))
    assert not os.path.exists(os.path.join(run, "codes.npy"))
    codes_out = str(tmp_path / "codes.npy")
    run_cli("sample.py", "random", "--run", run, "--n", "2", "--seed", "5", "--codes-out", codes_out)
    loaded = vqk.load_run(run)
    bottom, top = sample_levels(loaded.top_prior, loaded.prior, 4, seed=5)
    np.testing.assert_array_equal(np.load(codes_out), bottom)
    np.testing.assert_array_equal(np.load(codes_out[:-4] + "_top.npy"), top)
    status, out, err = call_main(sample.main, ["evaluate", "--run", run, "--data", data])
    assert status == 0, err
    results = json.load(open(os.path.join(run, "eval.json")))
    bits = (results["prior_nll"] * 16 + results["prior_nll_top"] * 4) / np.log(2)  # 4x4 and 2x2 codes per image
    assert results["prior_bits_per_image"] == pytest.approx(bits, rel=1e-6)
    status, _, err = call_main(train.main, ["prior", "--run", run, "--level", "bottom", "--resume", "--prior-depth", "1"])
    assert status == 2 and "--prior-depth 1 contradicts" in err, err
    # A resumed run keeps its levels.
    status, _, err = call_main(train.main, ["vqvae", "--run", run, "--resume", "--levels", "1", "--steps", "5"])
    assert status == 2 and "--levels 1 contradicts the run's saved levels = 2" in err, err


def bottom_prior(num_codes=8, **overrides):
    """32 px: a 4x4 top map under an 8x8 bottom one (a 3x3 convolution alone would not reach across)."""
    config = two_level(num_codes=num_codes, top_num_codes=16, **overrides)
    return config, vqk.build_prior(config, "bottom")


@pytest.mark.parametrize("kind", ["attention", "pixelcnn"])
def test_the_bottom_prior_sees_earlier_bottom_codes_and_the_whole_top_map(kind):
    """By perturbation: a later bottom code changes no earlier position's probabilities; every top
    code may change any position's (here the last top code changes the first position's)."""
    config, prior = bottom_prior(**PIXELCNN[kind])
    rng = np.random.default_rng(0)
    tokens = codes_to_tokens(rng.integers(0, 8, (3, 8, 8)))[:, :-1]  # (3, 64): start, codes 0..62
    top = rng.integers(0, 16, (3, 16))
    base = prior.predict([tokens, top], verbose=0)
    for k in (3, 40):  # input index k holds the code of position k - 1
        changed = tokens.copy()
        changed[:, k] = (changed[:, k] % 8) + 1  # another code
        out = prior.predict([changed, top], verbose=0)
        np.testing.assert_allclose(out[:, :k], base[:, :k], atol=1e-6)
        assert np.abs(out[:, k:] - base[:, k:]).max() > 1e-4
    changed_top = top.copy()
    changed_top[:, -1] = (changed_top[:, -1] + 1) % 16
    assert np.abs(prior.predict([tokens, changed_top], verbose=0)[:, 0] - base[:, 0]).max() > 1e-4


@pytest.mark.parametrize("kind", ["attention", "pixelcnn"])
def test_the_bottom_prior_has_no_gradient_from_later_bottom_codes(kind):
    """By gradients: position p's log-probabilities reach the embedding rows of the bottom codes
    before it and of no later one (each token id appears once), and the top code embeddings."""
    config, prior = bottom_prior(num_codes=64, **PIXELCNN[kind])
    tokens = np.concatenate([[0], np.random.default_rng(1).permutation(np.arange(1, 65))[:63]])[None].astype("int32")
    top = np.arange(16, dtype=np.int32)[None]
    rows = prior.get_layer("token_embedding" if kind == "attention" else "code_embedding").embeddings
    top_rows = prior.get_layer("top_condition").embedding.embeddings
    for p in (0, 20, 63):
        with tf.GradientTape() as tape:
            out = prior([tokens, top], training=False)
            target = tf.reduce_sum(tf.math.log(out[0, p]))
        grad, top_grad = tape.gradient(target, [rows, top_rows])
        grad, top_grad = tf.convert_to_tensor(grad).numpy(), tf.convert_to_tensor(top_grad).numpy()
        reach = np.abs(grad).sum(axis=1)
        # input index q holds the code of position q - 1 (index 0: the start token, which the
        # PixelCNN does not embed)
        assert (reach[tokens[0, 1:p + 1]] > 0).all() and (reach[tokens[0, p + 1:]] == 0).all(), p
        assert (np.abs(top_grad).sum(axis=1) > 0).all(), p  # all 16 top codes, from the first position on


@pytest.mark.parametrize("kind", ["attention", "pixelcnn"])
def test_the_compiled_samplers_draw_from_the_full_models(kind):
    """sample_levels' codes replayed through the full models, teacher forced: each top code is the
    Gumbel-max draw of the top prior's logits with the sampler's noise, each bottom code that of
    the bottom prior's under its sample's top map (the bottom level's own seed)."""
    from test_sampling import numpy_noise

    config = two_level(img_dim=16, top_num_codes=5, seed=2, **PIXELCNN[kind])
    top_prior, prior = vqk.build_prior(config, "top"), vqk.build_prior(config, "bottom")
    embedding = prior.get_layer("top_condition").embedding.embeddings  # the top map weighs enough to
    embedding.assign(embedding * 50)  # change draws: a sampler that reads the wrong part of it fails
    bottom, top = sample_levels(top_prior, prior, 3, seed=21, batch_size=2)
    assert bottom.shape == (3, 4, 4) and top.shape == (3, 2, 2) and top.max() < 5
    checked = []
    for model, codes, inputs, seed in [
            (top_prior, top, codes_to_tokens(top)[:, :-1], 21),
            (prior, bottom, [codes_to_tokens(bottom)[:, :-1], top.reshape(3, -1)], level_seed(21))]:
        logp = np.log(model.predict(inputs, verbose=0).astype(np.float64))
        for j in range(3):
            for i in range(codes[j].size):
                scores = logp[j, i] - np.log(-np.log(numpy_noise(seed, j, i, logp.shape[-1])))
                best = np.sort(scores)[::-1]
                if best[0] - best[1] > 1e-4:  # not a near-tie that float rounding may flip
                    checked.append(int(np.argmax(scores) == codes[j].flat[i]))
    assert len(checked) > 0.95 * 3 * (16 + 4) and all(checked)
    with pytest.raises(UsageError, match="top_codes"):
        sample_codes(prior, 2, (4, 4))


@pytest.mark.slow  # half a minute: five trainings
def test_the_bottom_prior_resumes_exactly(tmp_path):
    data = write_images(tmp_path / "images", count=12, size=16)
    config = lambda: tiny_config(data=data, seed=3, levels=2, val_split=0.25)  # noqa: E731
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_vqvae(config(), straight, steps=3)
    shutil.copytree(straight, resumed)
    train_prior(config(), straight, steps=5, deterministic=True)
    train_prior(config(), resumed, steps=5, deterministic=True, level="top")
    train_prior(config(), resumed, steps=2, deterministic=True, level="bottom")
    b = train_prior(config(), resumed, steps=5, resume=True, level="bottom")
    log = lambda run: open(os.path.join(run, "prior_log_bottom.csv")).read()  # noqa: E731
    assert log(resumed) == log(straight) and "val_nll" in log(straight)
    a = vqk.load_run(straight).prior
    for x, y in zip(a.variables, b.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


def test_one_level_runs_keep_their_names_and_keys():
    """One level is the reference: no top names in its models, logs or evaluation keys."""
    config = tiny_config()
    vqvae = vqk.build_vqvae(config)
    assert vqvae.top_vq_layer is None and vqvae.vq_layers == [vqvae.vq_layer]
    assert not [name for name in log_names(config) if name.endswith("_top")]
    assert "metric_suffix" not in vqvae.vq_layer.get_config()
    assert "levels" not in vqvae.train_model.get_layer("objective").get_config()
    assert [v.path for v in vqvae.vq_layer.variables] == ["vector_quantizer/codebook"]


def test_two_level_options_are_checked():
    with pytest.raises(UsageError, match="multiple of 8"):
        tiny_config(levels=2, img_dim=20).validate()
    with pytest.raises(UsageError, match="top_num_codes applies to levels 2"):
        tiny_config(top_num_codes=4).validate()
    with pytest.raises(UsageError, match="level must be"):
        vqk.build_prior(two_level())
    with pytest.raises(UsageError, match="has one level"):
        vqk.build_prior(tiny_config(), "top")



@pytest.mark.slow  # a quarter of a minute: six commands on a tiny run
def test_a_bottom_prior_stopped_before_its_first_checkpoint_can_be_trained_again(tmp_path):
    """Its log and grids, no checkpoint: --resume says so before the top prior trains again, and
    --level bottom --restart trains it anew alone, the top prior untouched, even with the images
    moved away (the bottom prior learns the code maps the top prior's stage wrote)."""
    data = write_images(tmp_path / "images", count=8, size=16)
    run = str(tmp_path / "run")
    for argv in (["vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--levels", "2", "--steps", "2"],
                 ["prior", "--run", run, "--level", "top", "--steps", "2", "--batch-size", "4", *PRIOR_FLAGS]):
        status, _, err = call_main(train.main, argv)
        assert status == 0, err
    status, _, err = call_main(sample.main, ["random", "--run", run])
    assert status == 2 and "has no trained bottom prior; run: python train.py prior --run" in err
    assert err.strip().endswith("--level bottom"), err
    top_weights = open(os.path.join(run, "prior_top.weights.h5"), "rb").read()
    top_log = open(os.path.join(run, "prior_log_top.csv")).read()
    with open(os.path.join(run, "prior_log_bottom.csv"), "w") as f:  # as a killed first epoch leaves it
        f.write("step,epoch,loss,accuracy,val_nll\n2,0,3.1,0.1,\n")

    status, _, err = call_main(train.main, ["prior", "--run", run, "--resume", "--steps", "4"])
    assert status == 2 and "stopped before its first checkpoint" in err and err.count("\n") == 1, err
    assert open(os.path.join(run, "prior_log_top.csv")).read() == top_log  # the top prior did not go on
    status, _, err = call_main(train.main, ["prior", "--run", run, "--level", "bottom", "--steps", "2"])
    assert status == 2 and "--restart to delete it" in err, err
    os.rename(data, data + "_moved")
    status, _, err = call_main(train.main, ["prior", "--run", run, "--level", "bottom", "--data", data + "_moved",
                                            "--steps", "2"])
    assert status == 2 and "--restart without --level trains one on another folder" in err, err
    status, _, err = call_main(train.main, ["prior", "--run", run, "--level", "bottom", "--restart", "--steps", "2"])
    assert status == 0, err
    assert os.path.isfile(os.path.join(run, "checkpoint", "prior_bottom.npz"))
    assert open(os.path.join(run, "prior_top.weights.h5"), "rb").read() == top_weights
    assert [row.split(",")[0] for row in open(os.path.join(run, "prior_log_bottom.csv")).read().splitlines()] == \
        ["step", "2"]


def kill_when(args, path, lines):
    """Start a command, SIGKILL it once `path` has more than `lines` lines; the step its
    checkpoint holds."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(path) and len(open(path).readlines()) > lines):
        time.sleep(0.05)
    proc.kill()  # no handler runs, possibly in the middle of a checkpoint write
    proc.wait(timeout=30)


def checkpoint_step(path):
    with np.load(path) as state:
        return json.loads(state["state"].tobytes())["step"]


@pytest.mark.slow  # about two minutes: four commands killed, four resumed
def test_kill_9_in_each_stage_then_resume(tmp_path):
    data = write_images(tmp_path / "images", count=8, size=16)
    run = str(tmp_path / "run")
    log, checkpoint = os.path.join(run, "log.csv"), os.path.join(run, "checkpoint", "vqvae.npz")
    kill_when(["train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--levels", "2", "--steps", "100000",
               "--sample-every", "5"], log, 13)
    saved = checkpoint_step(checkpoint)
    run_cli("train.py", "vqvae", "--run", run, "--resume", "--steps", str(saved + 2))
    assert [int(row.split(",")[0]) for row in open(log).read().splitlines()[1:]] == list(range(1, saved + 3))

    # Each prior: killed (checkpoints every 5 steps, 2 steps an epoch), resumed to a few steps more.
    for level in ("top", "bottom"):
        level_log = os.path.join(run, f"prior_log_{level}.csv")
        kill_when(["train.py", "prior", "--run", run, "--level", level, "--steps", "100000", "--batch-size", "4",
                   *(PRIOR_FLAGS if level == "top" else [])], level_log, 6)
        saved = checkpoint_step(os.path.join(run, "checkpoint", f"prior_{level}.npz"))
        assert saved >= 5
        run_cli("train.py", "prior", "--run", run, "--level", level, "--resume", "--steps", str(saved + 2))
        steps = [int(row.split(",")[0]) for row in open(level_log).read().splitlines()[1:]]
        last = [saved + 2] if saved % 2 else []  # the run's last step ends an epoch row of its own
        assert steps == list(range(2, saved + 3, 2)) + last, steps  # one row per epoch, none lost or repeated
    loaded = vqk.load_run(run)
    assert sample_levels(loaded.top_prior, loaded.prior, 2, seed=0)[0].shape == (2, 4, 4)
