"""The layout of the reconstruction and interpolation grids."""

import numpy as np

import vq_vae_keras as vqk
from vq_vae_keras.grids import interpolation_grid, reconstruction_grid
from vq_vae_keras.io import to_uint8

from conftest import tiny_config


class StandIn:
    """A VQ-VAE stand-in whose every step is known: encode = identity, quantize = rounding to
    quarters, decode = identity, reconstruct = negation (to tell it from the real images)."""

    def encode(self, images):
        return np.asarray(images, np.float32)

    def quantize(self, z):
        return None, np.round(np.asarray(z) * 4) / 4

    def decode(self, z):
        return np.asarray(z, np.float32)

    def reconstruct(self, images, quantize=True):
        return -np.asarray(images, np.float32)


def tiles(grid, n, d):
    """(n*d, n*d, 3) grid -> (n rows, n columns, d, d, 3)."""
    return grid.reshape(n, d, n, d, 3).transpose(0, 2, 1, 3, 4)


def test_reconstruction_grid_real_images_in_even_columns_their_reconstructions_in_odd():
    n, d = 4, 16
    images = np.random.default_rng(0).uniform(-1, 1, (n * n // 2, d, d, 3)).astype(np.float32)
    t = tiles(reconstruction_grid(StandIn(), images, n), n, d)
    pairs = images.reshape(n, n // 2, d, d, 3)  # row-major: row r holds images r*n/2 ... r*n/2 + n/2 - 1
    np.testing.assert_array_equal(t[:, 0::2], to_uint8(pairs))
    np.testing.assert_array_equal(t[:, 1::2], to_uint8(-pairs))


def test_reconstruction_grid_of_a_real_model_shows_its_own_reconstructions():
    vqvae = vqk.build_vqvae(tiny_config())
    n, d = 4, 16
    images = np.random.default_rng(1).uniform(-1, 1, (n * n // 2, d, d, 3)).astype(np.float32)
    for quantize in (True, False):
        t = tiles(reconstruction_grid(vqvae, images, n, quantize=quantize), n, d).astype(int)
        recon = to_uint8(vqvae.reconstruct(images, quantize=quantize)).reshape(n, n // 2, d, d, 3).astype(int)
        np.testing.assert_array_equal(t[:, 0::2], to_uint8(images).reshape(n, n // 2, d, d, 3))
        assert np.abs(t[:, 1::2] - recon).max() <= 1  # float noise across batch sizes


def test_interpolation_grid_goes_from_the_start_image_to_the_end_image():
    n, d = 5, 16
    rng = np.random.default_rng(2)
    starts, ends = rng.uniform(-1, 1, (2, n, d, d, 3)).astype(np.float32)
    t = tiles(interpolation_grid(StandIn(), starts, ends, n), n, d)
    quantized = lambda x: np.round(x * 4) / 4  # noqa: E731
    np.testing.assert_array_equal(t[:, 0], to_uint8(quantized(starts)))
    np.testing.assert_array_equal(t[:, -1], to_uint8(quantized(ends)))
    middle = quantized(0.5 * starts + 0.5 * ends)  # alpha = 2/4 in column 2
    np.testing.assert_array_equal(t[:, 2], to_uint8(middle))
