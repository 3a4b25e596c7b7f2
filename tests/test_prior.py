"""The attention prior: a distribution, causal, chunked attention, old weight files, training.
(Sampling: test_sampling.py.)"""

import math

import keras
import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras.priors import attention as attention_module
from vq_vae_keras.priors import build_prior
from vq_vae_keras.priors.tokens import codes_to_tokens, prior_nll, tokens_to_codes
from vq_vae_keras.training import split_validation

from conftest import tiny_config


@pytest.fixture(scope="module")
def prior():
    keras.utils.set_random_seed(0)
    config = tiny_config(img_dim=24)  # a 6x6 grid: 36 positions
    return config, build_prior(config)


def random_tokens(config, n, seed=0):
    h, w = config.grid_shape
    codes = np.random.default_rng(seed).integers(0, config.num_codes, (n, h, w))
    return codes, codes_to_tokens(codes)


def test_token_shift_round_trip():
    codes = np.random.default_rng(0).integers(0, 64, (5, 4, 3)).astype(np.int32)
    tokens = codes_to_tokens(codes)
    assert tokens.shape == (5, 13) and (tokens[:, 0] == 0).all() and tokens[:, 1:].min() >= 1
    np.testing.assert_array_equal(tokens[0, 1:4], codes[0, 0] + 1)  # row-major
    np.testing.assert_array_equal(tokens_to_codes(tokens, (4, 3)), codes)


def test_output_is_a_distribution_over_codes(prior):
    config, model = prior
    _, tokens = random_tokens(config, 2)
    probs = model.predict(tokens[:, :-1], verbose=0)
    assert probs.shape == (2, 36, config.num_codes)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)


def test_mask_is_causal(prior):
    config, model = prior
    _, tokens = random_tokens(config, 1)
    changed = tokens.copy()
    changed[0, 20:] = (changed[0, 20:] % config.num_codes) + 1  # change every token from 20 on
    a = model.predict(tokens[:, :-1], verbose=0)
    b = model.predict(changed[:, :-1], verbose=0)
    np.testing.assert_allclose(a[0, :20], b[0, :20], atol=1e-6)  # earlier outputs unchanged
    assert np.abs(a[0, 20:] - b[0, 20:]).max() > 1e-4


def test_chunked_attention_equals_the_plain_one_with_its_gradients(monkeypatch):
    """Long static sequences take the chunked, recomputed path; values and gradients must not change."""
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    attention = vqk.CausalSelfAttention(heads=2, head_dim=4)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 20, 6)), tf.float32)
    attention.build(x.shape)

    def value_and_grads():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = attention(x)
            loss = tf.reduce_sum(y * tf.range(1.0, 9.0))
        grads = tape.gradient(loss, [x, *attention.trainable_weights])
        return y.numpy(), [g.numpy() for g in grads]

    plain, plain_grads = value_and_grads()
    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 6)  # 20 positions -> chunks 6, 6, 6, 2
    chunked, chunked_grads = value_and_grads()
    np.testing.assert_allclose(chunked, plain, atol=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cache_path_gives_the_full_model_distributions(prior):
    """call_with_cache, one position at a time (eager, through the layers' own call), equals
    the whole-sequence model; the caches are shorter than the grid, as in a sampling segment."""
    config, model = prior
    _, tokens = random_tokens(config, 3, seed=1)
    full = model.predict(tokens[:, :-1], verbose=0)
    caches, steps = model.empty_caches(3, 20), []
    for i in range(20):
        logits, caches = model.call_with_cache(tokens[:, i:i + 1], caches, i)
        steps.append(keras.ops.convert_to_numpy(keras.ops.softmax(logits[:, 0])))
    np.testing.assert_allclose(np.stack(steps, axis=1), full[:, :20], atol=1e-5)


# The variables of a tiny prior.weights.h5 written by the code before the Prior model class
# (plain functional build_prior): files of earlier runs must keep loading.
OLD_WEIGHT_FILE_LAYOUT = [
    ("layers/causal_self_attention/vars/0", (16, 8)), ("layers/causal_self_attention/vars/1", (16, 8)),
    ("layers/causal_self_attention/vars/2", (16, 8)), ("layers/causal_self_attention_1/vars/0", (16, 8)),
    ("layers/causal_self_attention_1/vars/1", (16, 8)), ("layers/causal_self_attention_1/vars/2", (16, 8)),
    ("layers/dense/vars/0", (8, 16)), ("layers/dense/vars/1", (16,)), ("layers/dense_1/vars/0", (8, 16)),
    ("layers/dense_1/vars/1", (16,)), ("layers/dense_2/vars/0", (16, 8)), ("layers/dense_2/vars/1", (8,)),
    ("layers/embedding/vars/0", (9, 16)), ("layers/grid_position_embedding/vars/0", (6, 16)),
    ("layers/grid_position_embedding/vars/1", (6, 16)), ("layers/layer_normalization/vars/0", (16,)),
    ("layers/layer_normalization/vars/1", (16,)), ("layers/layer_normalization_1/vars/0", (16,)),
    ("layers/layer_normalization_1/vars/1", (16,)), ("layers/layer_normalization_2/vars/0", (16,)),
    ("layers/layer_normalization_2/vars/1", (16,))]


def test_weight_file_layout_is_unchanged_and_round_trips(prior, tmp_path):
    import h5py

    config, model = prior
    path = str(tmp_path / "prior.weights.h5")
    model.save_weights(path)
    with h5py.File(path) as f:
        layout = []
        f.visititems(lambda name, obj: layout.append((name, obj.shape)) if isinstance(obj, h5py.Dataset) else None)
    assert sorted(layout) == OLD_WEIGHT_FILE_LAYOUT
    other = build_prior(config)
    other.load_weights(path)
    _, tokens = random_tokens(config, 2)
    np.testing.assert_array_equal(other.predict(tokens[:, :-1], verbose=0), model.predict(tokens[:, :-1], verbose=0))


def test_chunked_prior_training_through_fit_equals_the_unchunked(monkeypatch):
    """A 20x20 grid (400 positions > QUERY_CHUNK) trains through fit on the chunked, recomputed
    attention; with one chunk the losses and the weights after a few steps must be the same."""
    config = tiny_config(img_dim=80)  # 20x20 codes
    tokens = random_tokens(config, 8, seed=2)[1]

    def train():
        keras.utils.set_random_seed(3)
        model = build_prior(config)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        history = model.fit(tokens[:, :-1], tokens[:, 1:] - 1, batch_size=4, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [w.numpy() for w in model.weights]

    remat, chunks = keras.remat, []
    monkeypatch.setattr(keras, "remat", lambda f: chunks.append(f) or remat(f))
    assert 400 > attention_module.QUERY_CHUNK
    chunked_loss, chunked_weights = train()
    assert chunks  # fit really took the chunked path
    chunks.clear()
    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 400)
    plain_loss, plain_weights = train()
    assert not chunks
    np.testing.assert_allclose(chunked_loss, plain_loss, rtol=1e-5)
    for a, b in zip(chunked_weights, plain_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_lowers_validation_nll_below_uniform():
    """Codes with structure (each row one repeated code) are learnable; NLL must beat log(K)."""
    config = tiny_config()
    rng = np.random.default_rng(0)
    codes = np.repeat(rng.integers(0, config.num_codes, (200, 4, 1)), 4, axis=2)
    train, val = split_validation(codes_to_tokens(codes), 0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    keras.utils.set_random_seed(0)
    model = build_prior(config)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    before = prior_nll(model, val)
    model.fit(train[:, :-1], train[:, 1:] - 1, batch_size=32, epochs=15, verbose=0)
    after = prior_nll(model, val)
    assert after < math.log(config.num_codes) - 0.3 and after < before


@pytest.mark.parametrize("prior", ["attention", "pixelcnn"])
def test_the_prior_seed_gives_the_initial_weights(prior):
    first, again, other = (build_prior(tiny_config(prior=prior, seed=seed, pixelcnn_width=8, pixelcnn_depth=2))
                           .get_weights() for seed in (3, 3, 4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
