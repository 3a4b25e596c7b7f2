"""The gated PixelCNN prior: a distribution, causal, no blind spot, its compiled sampler draws from
the full model's distributions (compiled once), class conditioning, training and reloading."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.priors.pixelcnn import PixelCNN
from vq_vae_keras.priors.sampling import sample_codes
from vq_vae_keras.priors.tokens import class_tokens, codes_to_tokens, prior_nll

from conftest import run_cli, tiny_config
from test_sampling import numpy_noise, restricted_logits

# A 5x5 code map; kernel 3 and depth 4 reach every earlier position of it (depth * (kernel // 2) >= 5 - 1).
PIXELCNN = dict(img_dim=20, prior="pixelcnn", pixelcnn_width=8, pixelcnn_depth=4, pixelcnn_kernel=3)


def shaken(model, seed=0, scale=0.3):
    """The model with noise added to every weight: outputs that depend on an input visibly do."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, scale, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def pixelcnn():
    keras.utils.set_random_seed(0)
    config = tiny_config(**PIXELCNN)
    return config, shaken(vqk.build_prior(config))


def random_tokens(config, n, seed=0):
    codes = np.random.default_rng(seed).integers(0, config.num_codes, (n, *config.grid_shape))
    return codes_to_tokens(codes)[:, :-1]


def test_output_is_a_distribution_for_any_prefix_length(pixelcnn):
    config, model = pixelcnn
    tokens = random_tokens(config, 3)
    probs = keras.ops.convert_to_numpy(model(tokens))
    assert isinstance(model, PixelCNN) and probs.shape == (3, 25, config.num_codes)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    # a prefix gives the same distributions as the whole sequence there: positions after it are unseen
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(tokens[:, :9])), probs[:, :9], atol=1e-6)


def test_changing_a_code_never_changes_an_earlier_distribution(pixelcnn):
    """Causality, by perturbation of every position: the distribution at position p (of code p)
    may depend on codes 0..p-1 only."""
    config, model = pixelcnn
    tokens = random_tokens(config, 1, seed=1)
    length = tokens.shape[1]
    changed = np.repeat(tokens, length - 1, axis=0)
    for q in range(length - 1):  # row q changes code q (token q + 1)
        changed[q, q + 1] = changed[q, q + 1] % config.num_codes + 1
    base = model.predict(tokens, verbose=0)[0]
    probs = model.predict(changed, verbose=0)
    for q in range(length - 1):
        np.testing.assert_allclose(probs[q, :q + 1], base[:q + 1], atol=1e-6, err_msg=f"code {q} leaks backwards")
        if (q + 1) % config.grid_shape[1]:  # a row's first position need not see the previous row's end
            assert np.abs(probs[q, q + 1] - base[q + 1]).max() > 1e-4, f"position {q + 1} ignores the code left of it"


def test_no_blind_spot_the_last_position_depends_on_every_earlier_one(pixelcnn):
    """A PixelCNN with one masked stack cannot see the codes above-right of a position; the
    gated two-stack one sees them all: changing ANY earlier code changes the last distribution,
    and the gradient of the last logits reaches every earlier position's embedding."""
    config, model = pixelcnn
    tokens = random_tokens(config, 1, seed=2)
    length = tokens.shape[1]
    changed = np.repeat(tokens, length - 1, axis=0)
    for q in range(length - 1):
        changed[q, q + 1] = changed[q, q + 1] % config.num_codes + 1
    last = model.predict(changed, verbose=0)[:, -1]
    base = model.predict(tokens, verbose=0)[0, -1]
    moved = np.abs(last - base).max(-1)
    assert (moved > 0).all(), f"blind spot at codes {np.flatnonzero(moved == 0)}"  # no path: exactly equal

    # the same by gradients, through the embedded code map the model makes (its codes: tokens[:, 1:], padded)
    embedding = model.embedding
    x = tf.convert_to_tensor(embedding(np.pad(tokens[:, 1:], ((0, 0), (0, 1)))))
    embedding.call = lambda ids: x  # the model's lookup now returns the watched tensor
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = tf.math.log(model(tokens)[0, -1, int(np.argmax(base))])
        grad = tape.gradient(out, x).numpy()[0]  # (25, C): d out / d each code's embedding
    finally:
        del embedding.call
    reach = np.abs(grad).sum(-1)
    assert (reach[:length - 1] > 0).all() and reach[length - 1] == 0  # code 24 itself is not seen


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_the_compiled_sampler_draws_from_the_full_model(pixelcnn, options):
    """Each code drawn row by row on windows is the Gumbel-max draw that the FULL model's
    distributions (teacher forced on the drawn prefix, restricted in NumPy) give with the
    sampler's noise: the incremental stacks are exactly the whole-map ones."""
    config, model = pixelcnn
    n, seed, length = 4, 5, 25
    codes = sample_codes(model, n, config.grid_shape, seed=seed, batch_size=n, **options)
    np.testing.assert_array_equal(codes, sample_codes(model, n, config.grid_shape, seed=seed, batch_size=1, **options))
    probs = model.predict(codes_to_tokens(codes)[:, :-1], verbose=0).astype(np.float64)
    t, k, p = options.get("temperature", 1.0), options.get("top_k", config.num_codes), options.get("top_p", 1.0)
    checked = 0
    for j in range(n):
        for i in range(length):
            scores = restricted_logits(np.log(probs[j, i]), t, k, p) - np.log(-np.log(numpy_noise(seed, j, i, len(probs[j, i]))))
            best = np.sort(scores)[::-1]
            if best[0] - best[1] > 1e-4:  # not a near-tie that float rounding may flip
                assert np.argmax(scores) == codes[j].flat[i], (j, i)
                checked += 1
    assert checked > 0.95 * n * length


def test_the_sampler_is_compiled_once_and_reads_new_weights():
    keras.utils.set_random_seed(3)
    config = tiny_config(**{**PIXELCNN, "img_dim": 16})
    model = shaken(vqk.build_prior(config), seed=3)
    sample_codes(model, 2, config.grid_shape, seed=0, batch_size=2)
    assert model.sampler().tracing_count() == 1
    for options in [dict(seed=1), dict(temperature=0.5), dict(top_k=2), dict(top_p=0.5)]:
        sample_codes(model, 2, config.grid_shape, batch_size=2, **options)
    shaken(model, seed=4)
    greedy = sample_codes(model, 2, config.grid_shape, top_k=1, seed=0, batch_size=2)
    probs = model.predict(codes_to_tokens(greedy)[:, :-1], verbose=0)
    np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(2, -1))
    assert model.sampler().tracing_count() == 1


def test_one_program_serves_every_row():
    """The row is a runtime argument of the compiled row function, not a compile-time constant:
    XLA's program is the same for rows 1 and 2 (with tf.slice at the row, XLA folded the row in
    and compiled once per row: 32 compilations for a 32x32 map's first call)."""
    keras.utils.set_random_seed(3)
    config = tiny_config(**{**PIXELCNN, "img_dim": 16})
    model = vqk.build_prior(config)
    sample_codes(model, 2, config.grid_shape, seed=0, batch_size=2)
    reach, h, w = model.kernel // 2, model.height, model.width
    stacks = [tf.zeros((2, reach + h + 1, 2 * reach + w, model.channels), model.compute_dtype)
              for _ in range(model.depth)]
    rest = (tf.zeros((2, h * w), tf.int32), tf.constant([-1, -1]), tf.constant((0, 0), tf.int64), tf.constant(1.0),
            tf.constant(config.num_codes), tf.constant(1.0))
    function = model.sampler().function
    programs = [function.experimental_get_compiler_ir(tf.constant(row), stacks, *rest)(stage="hlo") for row in (1, 2)]
    assert re.sub(r"HloModule \S+", "", programs[0]) == re.sub(r"HloModule \S+", "", programs[1])


def test_class_conditioning_biases_every_position_and_greedy_samples_follow_the_class():
    keras.utils.set_random_seed(5)
    config = tiny_config(**{**PIXELCNN, "img_dim": 16}, classes=["red", "blue"])
    model = shaken(vqk.build_prior(config), seed=5, scale=0.5)
    codes = np.random.default_rng(0).integers(0, 8, (1, 4, 4))
    red, blue = (model.predict(codes_to_tokens(codes, class_tokens([c], 8))[:, :-1], verbose=0)[0] for c in (0, 1))
    assert (np.abs(red - blue).max(-1) > 1e-4).all()  # the class reaches the first position and every later one
    greedy = sample_codes(model, 4, config.grid_shape, top_k=1, seed=0, classes=["red", "blue", 1, "red"])
    probs = model.predict(codes_to_tokens(greedy, class_tokens([0, 1, 1, 0], 8))[:, :-1], verbose=0)
    np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(4, -1))
    np.testing.assert_array_equal(greedy[0], greedy[3])
    with pytest.raises(vqk.UsageError, match="unknown class 'green'"):
        sample_codes(model, 1, config.grid_shape, classes="green")


@pytest.mark.slow
def test_train_prior_learns_and_the_run_reloads_in_a_fresh_process(tmp_path):
    """train_prior with prior="pixelcnn" (the production path): the NLL falls below uniform's;
    load_run in a new process rebuilds the PixelCNN from config.json with the same distributions."""
    from conftest import write_images

    config = tiny_config(**{**PIXELCNN, "img_dim": 16, "pixelcnn_width": 16}, data=write_images(tmp_path / "images", 8))
    run = str(tmp_path / "run")
    vqk.train_vqvae(config, run, steps=2)
    config.prior_batch_size, config.sample_every_epochs = 8, 0
    prior = vqk.train_prior(config, run, steps=40)
    codes = np.load(os.path.join(run, "codes.npy"))
    nll = prior_nll(prior, codes_to_tokens(codes))
    assert nll < 0.8 * np.log(config.num_codes)
    probs = prior.predict(codes_to_tokens(codes[:2])[:, :-1], verbose=0)
    np.save(tmp_path / "expected.npy", probs)
    script = ("import sys, numpy as np, vq_vae_keras as vqk\n"
              "from vq_vae_keras.priors.tokens import codes_to_tokens\n"
              "run = vqk.load_run(sys.argv[1])\n"
              "assert type(run.prior).__name__ == 'PixelCNN', type(run.prior)\n"
              "codes = np.load(sys.argv[1] + '/codes.npy')[:2]\n"
              "np.testing.assert_allclose(run.prior.predict(codes_to_tokens(codes)[:, :-1], verbose=0),"
              " np.load(sys.argv[2]), atol=1e-6)\n")
    run_cli("-c", script, run, str(tmp_path / "expected.npy"))


def test_a_pixelcnn_too_shallow_for_its_code_map_is_refused():
    """depth * (kernel // 2) < width - 1 leaves a blind spot (the test above fails on such a model):
    the config refuses it, naming the fields to raise."""
    with pytest.raises(vqk.UsageError, match="raise pixelcnn_depth or pixelcnn_kernel"):
        vqk.Config(**{**PIXELCNN, "pixelcnn_depth": 3}).validate()
    vqk.Config(**{**PIXELCNN, "pixelcnn_depth": 3, "prior": "attention"}).validate()  # only the PixelCNN's concern
