"""Fast autoregressive sampling from the prior with a key/value cache.

The reference reruns the whole prefix for every new position (O(L^2) work and one predict call
per position). Here each position costs one token's work: every attention block keeps the keys
and values of earlier positions in a fixed-size cache, and one compiled step (fixed shapes, the
position as a tensor) serves all positions. The distributions are those of the full model.
"""

import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

from .prior import START_TOKEN


class CachedPrior:
    """Runs a prior built by `build_prior` one position at a time."""

    def __init__(self, prior):
        self.prior = prior
        self.position = prior.get_layer("position_embedding")
        self.length = self.position.height * self.position.width
        self.blocks = []
        i = 0
        while any(layer.name == f"block{i}_attention" for layer in prior.layers):
            self.blocks.append(tuple(prior.get_layer(f"block{i}_{part}") for part in ("attention", "dense", "norm")))
            i += 1
        self.output = prior.get_layer("next_code")
        self._step = tf.function(self._step_eager)

    def empty_cache(self, batch):
        attention = self.blocks[0][0]
        shape = (batch, attention.heads, self.length, attention.head_dim)
        return [(tf.zeros(shape, self.prior.compute_dtype), tf.zeros(shape, self.prior.compute_dtype))
                for _ in self.blocks]

    def _step_eager(self, token, index, cache):
        """token (batch,) at position index -> (next-code logits (batch, num_codes), new cache)."""
        x = self.prior.get_layer("token_embedding")(token[:, None])
        x = x + self.position.position(index)
        x = self.prior.get_layer("embedding_norm")(x)
        new_cache = []
        for (attention, dense, norm), (k, v) in zip(self.blocks, cache):
            a, k, v = attention.step(x, k, v, index)
            x = norm(dense(a) + x)
            new_cache.append((k, v))
        logits = ops.matmul(x[:, 0], self.output.kernel) + self.output.bias
        return logits, new_cache

    def step(self, token, index, cache):
        return self._step(tf.convert_to_tensor(token, tf.int32), tf.constant(index, tf.int32), cache)

    def probabilities(self, tokens):
        """Teacher-forced next-code probabilities of (batch, length) tokens through the cache path."""
        tokens = np.asarray(tokens, np.int32)
        cache, out = self.empty_cache(len(tokens)), []
        for i in range(tokens.shape[1]):
            logits, cache = self.step(tokens[:, i], i, cache)
            out.append(ops.convert_to_numpy(ops.softmax(logits, axis=-1)))
        return np.stack(out, axis=1)


@tf.function
def _draw(logits, temperature, top_k, seed):
    """One code per row from softmax(logits / temperature), restricted to the top_k likeliest."""
    logits = tf.cast(logits, tf.float32) / temperature
    kth_best = tf.math.top_k(logits, k=top_k).values[:, -1:]
    logits = tf.where(logits < kth_best, tf.constant(-np.inf, tf.float32), logits)
    return tf.cast(tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0], tf.int32)


def sample_codes(prior, n, grid_shape, temperature=1.0, top_k=None, seed=None, batch_size=64, progress=False):
    """n code maps (n, h, w) int32 drawn from the prior, position by position.

    temperature=1 and top_k=None is the reference's plain sampling; other values are departures.
    The same seed gives the same codes; seed=None draws a fresh one.
    """
    h, w = grid_shape
    num_codes = prior.output.shape[-1]
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= num_codes:
        raise ValueError(f"top_k must be in [1, {num_codes}], got {top_k}")
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    cached = CachedPrior(prior)
    if cached.length != h * w:
        raise ValueError(f"grid {grid_shape} does not match the prior's {cached.position.height}x{cached.position.width}")
    temperature = tf.constant(temperature, tf.float32)
    k = tf.constant(top_k or num_codes, tf.int32)
    out = np.empty((n, h * w), np.int32)
    bar = tqdm(total=n * h * w, desc="sampling", unit="code", disable=not progress)
    for chunk, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        token = np.full((size,), START_TOKEN, np.int32)
        cache = cached.empty_cache(size)
        for i in range(h * w):
            logits, cache = cached.step(token, i, cache)
            code = _draw(logits, temperature, k, tf.constant([seed, chunk * h * w + i], tf.int64))
            out[start:start + size, i] = code.numpy()
            token = code + 1
            bar.update(size)
    bar.close()
    return out.reshape(n, h, w)
