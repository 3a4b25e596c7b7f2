"""The vector quantizer, the straight-through wiring and the architecture, against NumPy."""

import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.quantizers import perplexity

from conftest import tiny_config


def test_nearest_code_matches_numpy_brute_force():
    layer = vqk.VectorQuantizer(16)
    z = np.random.default_rng(0).normal(size=(3, 5, 5, 6)).astype(np.float32)
    codes, vectors = (np.asarray(t) for t in layer(z))
    codebook = layer.codebook.numpy()
    distances = ((z[..., None, :] - codebook) ** 2).sum(-1)
    assert codes.dtype == np.int32 and codes.shape == (3, 5, 5)
    assert codes.min() >= 0 and codes.max() < 16
    np.testing.assert_array_equal(codes, distances.argmin(-1))
    np.testing.assert_allclose(vectors, codebook[codes], rtol=0, atol=0)


def test_codebook_initialised_uniform_in_reference_range():
    layer = vqk.VectorQuantizer(64)
    layer.build((None, 128))
    values = layer.codebook.numpy()
    assert values.shape == (64, 128)
    assert values.min() >= -0.05 and values.max() <= 0.05 and values.std() > 0.02


def _pieces(config, seed=0):
    vqvae = vqk.build_vqvae(config)
    x = np.random.default_rng(seed).uniform(-1, 1, (2, config.img_dim, config.img_dim, 3)).astype(np.float32)
    return vqvae, x


def test_straight_through_gradients():
    config = tiny_config(beta=0.25)
    vqvae, x = _pieces(config)
    z = vqvae.encoder(x, training=True)
    codebook = vqvae.vq_layer.codebook

    # The gradient the decoder sends back for input e ...
    _, e = vqvae.vq_layer(z)
    e_const = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(e_const)
        mse_x = tf.reduce_mean(tf.square(x - vqvae.decoder(e_const, training=True)))
    grad_decoder_input = tape.gradient(mse_x, e_const).numpy()

    # ... reaches z unchanged through z + stop_gradient(e - z), plus beta * d(mse_z)/dz.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        codes, e, ze = vqvae.vq_layer(z, return_decoder_input=True)  # ze: what the decoder sees
        x_rec = vqvae.decoder(ze, training=True)
        mse_x = tf.reduce_mean(tf.square(x - x_rec))
        objective = vqvae.train_model.get_layer("objective")
        objective([x, x_rec, z, e])
        total = tf.add_n(objective.losses)  # the whole objective: mse_x + mse_e + beta * mse_z
    np.testing.assert_allclose(ze.numpy(), e.numpy(), atol=1e-6)  # forward value: the code vector
    np.testing.assert_allclose(tape.gradient(mse_x, z).numpy(), grad_decoder_input, rtol=1e-4, atol=1e-6)
    n = np.prod(z.shape)
    expected_z = grad_decoder_input + config.beta * 2 * (z.numpy() - e.numpy()) / n
    np.testing.assert_allclose(tape.gradient(total, z).numpy(), expected_z, rtol=1e-4, atol=1e-6)

    # The codebook gets gradient only from mse_e = mean((sg(z) - e)^2): 2 (e_k - z) / n summed over uses.
    assert tape.gradient(mse_x, codebook) is None or not np.any(tape.gradient(mse_x, codebook))
    expected_codebook = np.zeros(codebook.shape, np.float64)
    np.add.at(expected_codebook, codes.numpy().ravel(),
              2 * (e.numpy() - z.numpy()).reshape(-1, z.shape[-1]) / n)
    np.testing.assert_allclose(tf.convert_to_tensor(tape.gradient(total, codebook)).numpy(), expected_codebook, rtol=1e-4, atol=1e-9)


def test_train_model_loss_is_mse_x_plus_mse_e_plus_beta_mse_z():
    config = tiny_config(beta=0.4)
    vqvae, x = _pieces(config)
    model = vqvae.train_model
    x_rec = model(x, training=False).numpy()
    z = vqvae.encoder(x, training=False).numpy()
    e = vqvae.quantizer(z)[1].numpy()
    expected = ((x - x_rec) ** 2).mean() + ((z - e) ** 2).mean() * (1 + 0.4)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-5)


def test_parameter_counts_at_reference_config():
    """Counted by hand from REFERENCE.md at img_dim 128, z_dim 128, num_codes 64 (3 residual blocks)."""
    d = 128
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    bn = 2 * d  # trainable gamma and beta
    block = conv(3, d, d) + bn + conv(1, d, d)
    encoder = conv(4, 3, d) + bn + conv(4, d, d) + bn + 3 * block + 2 * bn  # 762,624
    decoder = 3 * (bn + block) + conv(4, d, d) + bn + conv(4, d, 3)  # 762,499
    codebook = 64 * d

    vqvae = vqk.build_vqvae(vqk.Config())
    count = lambda weights: sum(int(np.prod(w.shape)) for w in weights)  # noqa: E731
    assert count(vqvae.encoder.trainable_weights) == encoder == 762_624
    assert count(vqvae.decoder.trainable_weights) == decoder == 762_499
    assert count(vqvae.vq_layer.trainable_weights) == codebook
    assert count(vqvae.train_model.trainable_weights) == encoder + decoder + codebook
    assert vqvae.encoder.output.shape == (None, 32, 32, 128)
    assert vqvae.decoder.output.shape == (None, 128, 128, 3)


def test_no_residual_blocks_below_32px():
    assert vqk.Config(img_dim=16).num_layers == 0 and vqk.Config(img_dim=32).num_layers == 1
    assert vqk.Config(img_dim=128).num_layers == 3 and vqk.Config(img_dim=256).num_layers == 4


def test_perplexity_against_numpy():
    codes = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    p = np.bincount(codes, minlength=6) / len(codes)
    expected = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
    np.testing.assert_allclose(float(perplexity(codes, 6)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(perplexity(np.arange(6), 6)), 6.0, rtol=1e-6)
    np.testing.assert_allclose(float(perplexity(np.zeros(9, int), 6)), 1.0, rtol=1e-6)


def test_config_seed_gives_the_initial_weights_without_touching_global_state():
    """Same seed, same weights, in one process and without deterministic=True; another seed,
    other weights. Python's random state is left where it was."""
    import random

    state = random.getstate()
    first, again, other = (vqk.build_vqvae(tiny_config(seed=seed)).train_model.get_weights() for seed in (0, 0, 1))
    assert random.getstate() == state
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    random_ones = [i for i, w in enumerate(first) if w.std() > 0]  # kernels and codebook, not zeros/ones
    assert len(random_ones) >= 5 and all(not np.array_equal(first[i], other[i]) for i in random_ones)
    assert len({first[i].flat[0] for i in random_ones}) == len(random_ones)  # a seed of its own per layer


@pytest.mark.parametrize("batch_size", [0, 1.5, "8", True])
def test_batched_helpers_check_their_batch_size(batch_size):
    from vq_vae_keras.errors import UsageError

    vqvae = vqk.build_vqvae(tiny_config())
    with pytest.raises(UsageError, match="batch_size must be an integer >= 1"):
        vqvae.reconstruct(np.zeros((2, 16, 16, 3), np.float32), batch_size=batch_size)
