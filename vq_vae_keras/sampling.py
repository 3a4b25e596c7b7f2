"""Fast autoregressive sampling from the prior with a key/value cache.

The reference reruns the whole prefix for every new position (O(L^2) work and one predict call
per position). Here each position costs one token's work: every attention block keeps the keys
and values of earlier positions in a fixed-size cache. Positions run inside one XLA-compiled
loop (the caches are updated in place, no Python between positions), and independent batches of
samples run side by side on the CPU cores. The distributions are those of the full model.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

from .prior import START_TOKEN

# Positions per compiled call: the loop returns to Python this often, to move the progress bar.
POSITIONS_PER_CALL = 64


class CachedPrior:
    """Runs a prior built by `build_prior` one position at a time."""

    def __init__(self, prior):
        self.prior = prior
        self.position = prior.get_layer("position_embedding")
        self.length = self.position.height * self.position.width
        self.num_codes = prior.output.shape[-1]
        self.blocks = []
        i = 0
        while any(layer.name == f"block{i}_attention" for layer in prior.layers):
            self.blocks.append(tuple(prior.get_layer(f"block{i}_{part}") for part in ("attention", "dense", "norm")))
            i += 1
        self.output = prior.get_layer("next_code")
        self._step = tf.function(self._step_eager)
        self._sample = tf.function(self._sample_positions, jit_compile=True)

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

    def _sample_positions(self, start, stop, token, cache, codes, seed, temperature, top_k):
        """Draws positions start..stop-1 in one compiled loop; codes (batch, length) is filled in."""
        def body(i, token, cache, codes):
            logits, cache = self._step_eager(token, i, cache)
            code = draw(logits, temperature, top_k, tf.stack([seed[0], seed[1] + tf.cast(i, tf.int64)]))
            codes = ops.slice_update(codes, [0, i], code[:, None])
            return i + 1, code + 1, cache, codes

        _, token, cache, codes = tf.while_loop(lambda i, *_: i < stop, body, (start, token, cache, codes))
        return token, cache, codes

    def sample(self, batch, seed, temperature, top_k, on_progress=None):
        """(batch, length) int32 codes; seed is a pair of ints."""
        token = tf.fill((batch,), START_TOKEN)
        cache = self.empty_cache(batch)
        codes = tf.zeros((batch, self.length), tf.int32)
        seed = tf.constant(seed, tf.int64)
        temperature, top_k = tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32)
        for start in range(0, self.length, POSITIONS_PER_CALL):
            stop = min(start + POSITIONS_PER_CALL, self.length)
            token, cache, codes = self._sample(tf.constant(start), tf.constant(stop), token, cache, codes,
                                               seed, temperature, top_k)
            if on_progress:
                on_progress(batch * (stop - start))
        return codes.numpy()


def draw(logits, temperature, top_k, seed):
    """One code per row from softmax(logits / temperature), restricted to the top_k likeliest.

    Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits), and unlike
    tf.random.categorical it compiles with XLA. top_k is a tensor, so changing it does not recompile.
    """
    logits = tf.cast(logits, tf.float32) / temperature
    kth_best = tf.gather(tf.sort(logits, direction="DESCENDING"), top_k - 1, axis=-1)[:, None]
    logits = tf.where(logits < kth_best, tf.constant(-np.inf, tf.float32), logits)
    uniform = tf.random.stateless_uniform(tf.shape(logits), seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return tf.cast(tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1), tf.int32)


def sample_codes(prior, n, grid_shape, temperature=1.0, top_k=None, seed=None, batch_size=16, progress=False):
    """n code maps (n, h, w) int32 drawn from the prior, position by position.

    temperature=1 and top_k=None is the reference's plain sampling; other values are departures.
    The same seed (and batch_size) gives the same codes; seed=None draws a fresh one. Batches of
    batch_size run in parallel, one per CPU core; the last is padded so that all share one compile.
    """
    h, w = grid_shape
    cached = CachedPrior(prior)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= cached.num_codes:
        raise ValueError(f"top_k must be in [1, {cached.num_codes}], got {top_k}")
    if cached.length != h * w:
        raise ValueError(f"grid {grid_shape} does not match the prior's {cached.position.height}x{cached.position.width}")
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    batch = min(batch_size, n)
    bar = tqdm(total=n * h * w, desc="sampling", unit="code", disable=not progress)

    def one_batch(index):
        # Each batch's noise comes from its own stream: seed, then batch index * length + position.
        return cached.sample(batch, (seed, index * cached.length), temperature, top_k or cached.num_codes,
                             on_progress=bar.update)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        codes = np.concatenate(list(pool.map(one_batch, range(-(-n // batch)))))[:n]
    bar.close()
    return codes.reshape(n, h, w)
