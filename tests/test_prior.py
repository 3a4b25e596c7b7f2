"""The attention prior: causal, cached sampling equals the full model, sampling options."""

import math

import keras
import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras.prior import build_prior, codes_to_tokens, prior_nll, tokens_to_codes
from vq_vae_keras.sampling import CachedPrior, sample_codes
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


def test_cached_step_gives_the_full_model_distributions(prior):
    config, model = prior
    _, tokens = random_tokens(config, 3, seed=1)
    full = model.predict(tokens[:, :-1], verbose=0)
    cached = CachedPrior(model).probabilities(tokens[:, :-1])
    np.testing.assert_allclose(cached, full, atol=1e-5)


def test_chunked_attention_equals_the_plain_one_with_its_gradients(monkeypatch):
    """Long static sequences take the chunked, recomputed path; values and gradients must not change."""
    import tensorflow as tf
    from vq_vae_keras import layers as vq_layers

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
    monkeypatch.setattr(vq_layers, "QUERY_CHUNK", 6)  # 20 positions -> chunks 6, 6, 6, 2
    chunked, chunked_grads = value_and_grads()
    np.testing.assert_allclose(chunked, plain, atol=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_draw_follows_the_tempered_softmax():
    """Gumbel-max draws: frequencies match softmax(logits / T), and top-k keeps only the k best."""
    from vq_vae_keras.sampling import draw

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 20000, np.float32))
    for temperature in (1.0, 0.5):
        codes = draw(logits, temperature, 4, [3, 0]).numpy()
        p = np.exp(logits[0] / temperature)
        p /= p.sum()
        np.testing.assert_allclose(np.bincount(codes, minlength=4) / len(codes), p, atol=0.012)
    codes = draw(logits, 1.0, 2, [3, 1]).numpy()
    np.testing.assert_allclose(np.bincount(codes, minlength=4) / len(codes), [0.625, 0.375, 0, 0], atol=0.012)


def test_cached_step_is_traced_once(prior):
    _, model = prior
    cached = CachedPrior(model)
    cached.probabilities(np.zeros((2, 10), np.int32))
    assert cached._step.experimental_get_tracing_count() == 1


def test_sampling_is_reproducible_with_a_seed(prior):
    config, model = prior
    # batch_size 2: three batches on parallel threads, the last padded
    a = sample_codes(model, 5, config.grid_shape, seed=7, batch_size=2)
    b = sample_codes(model, 5, config.grid_shape, seed=7, batch_size=2)
    c = sample_codes(model, 5, config.grid_shape, seed=8, batch_size=2)
    assert a.shape == (5, 6, 6) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < config.num_codes
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_top_k_never_draws_outside_the_k_best(prior):
    config, model = prior
    codes = sample_codes(model, 6, config.grid_shape, top_k=2, seed=3)
    probs = model.predict(codes_to_tokens(codes)[:, :-1], verbose=0)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    assert (top2 == codes.reshape(6, -1, 1)).any(-1).all()
    greedy = sample_codes(model, 2, config.grid_shape, top_k=1, seed=3)
    probs = model.predict(codes_to_tokens(greedy)[:, :-1], verbose=0)
    np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(2, -1))


def test_bad_sampling_options(prior):
    config, model = prior
    with pytest.raises(ValueError):
        sample_codes(model, 1, config.grid_shape, temperature=0)
    with pytest.raises(ValueError):
        sample_codes(model, 1, config.grid_shape, top_k=config.num_codes + 1)
    with pytest.raises(ValueError):
        sample_codes(model, 1, (5, 5))


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
