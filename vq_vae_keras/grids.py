"""The reference's picture grids: reconstructions, interpolations and random samples.
Every grid is computed with batched predictions, then tiled row-major."""

import numpy as np

from .io import tile


def reconstruction_grid(vqvae, images, n, quantize=True):
    """n*n//2 real images -> n x n grid: even columns real, each odd column the reconstruction of
    the image to its left (test_ae_2; test_ae_1 with quantize=False)."""
    if n < 2 or n % 2:
        raise ValueError(f"a reconstruction grid needs an even n >= 2, got {n}")
    recon = vqvae.reconstruct(images, quantize=quantize)
    tiles = np.stack([images, recon], axis=1).reshape(n * n, *images.shape[1:])  # real, recon, real, ...
    return tile(tiles, n)


def interpolation_grid(vqvae, starts, ends, n):
    """n rows; row i goes from starts[i] to ends[i] in n steps: z = (1-a) z1 + a z2, a = j/(n-1),
    quantized, decoded (two levels: each level's latents interpolated so)."""
    alpha = np.linspace(0.0, 1.0, n, dtype=np.float32).reshape(1, n, 1, 1, 1)

    def steps(z1, z2):  # (n rows, h, w, dim) twice -> (n rows * n steps, h, w, dim)
        return ((1 - alpha) * z1[:, None] + alpha * z2[:, None]).reshape(n * n, *z1.shape[1:])

    z1, z2 = vqvae.encode(starts), vqvae.encode(ends)
    z = [steps(a, b) for a, b in zip(z1, z2)] if isinstance(z1, list) else steps(z1, z2)
    _, vectors = vqvae.quantize(z)
    return tile(vqvae.decode(vectors), n)


def codes_grid(vqvae, codes):
    """(n*n, h, w) code maps (two levels: [bottom, top]) -> decoded n x n grid (codebook lookup -> decoder)."""
    n = int(round(len(codes[0] if isinstance(codes, list) else codes) ** 0.5))
    return tile(vqvae.decode(vqvae.codes_to_vectors(codes)), n)
