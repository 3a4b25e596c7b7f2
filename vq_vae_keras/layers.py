"""Custom Keras layers of the prior: grid position embedding and causal self-attention. All written
with keras.ops and serializable. The quantizer layers live in quantizers.py."""

import keras
from keras import ops

PACKAGE = "vq_vae_keras"


@keras.saving.register_keras_serializable(package=PACKAGE)
class GridPositionEmbedding(keras.layers.Layer):
    """Adds a learned row and column embedding to a flattened (row-major) grid sequence.

    Input (batch, length, dim) with length <= height * width; position p has row p // width and
    column p % width (the reference's two Embedding layers on Lambda-made position ids).
    """

    def __init__(self, height, width, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = height, width

    def build(self, input_shape):
        init = keras.initializers.RandomUniform(-0.05, 0.05)  # Embedding's default
        dim = input_shape[-1]
        self.rows = self.add_weight(name="rows", shape=(self.height, dim), initializer=init)
        self.cols = self.add_weight(name="cols", shape=(self.width, dim), initializer=init)

    def position(self, p):
        """Embedding of positions p (any int shape) -> p.shape + (dim,)."""
        return ops.take(self.rows, p // self.width, axis=0) + ops.take(self.cols, p % self.width, axis=0)

    def call(self, x):
        return x + ops.expand_dims(self.position(ops.arange(ops.shape(x)[1])), 0)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


def _mask_value(dtype):
    # Large enough that exp() underflows to 0, small enough to stay finite in float16.
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


# Query positions per attention chunk on long sequences: bounds the scores held per block.
QUERY_CHUNK = 256


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalSelfAttention(keras.layers.Layer):
    """Masked multi-head self-attention as in the reference's `Attention(8, 32, mask_right=True)`:
    q, k, v projections without bias, no output projection, position i attends to 0..i.

    Input (batch, length, dim) -> output (batch, length, heads * head_dim).
    `step` runs one new position against a key/value cache, for fast sampling.
    """

    def __init__(self, heads=8, head_dim=32, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_dim = heads, head_dim

    def build(self, input_shape):
        shape = (input_shape[-1], self.heads * self.head_dim)
        self.query = self.add_weight(name="query", shape=shape, initializer="glorot_uniform")
        self.key = self.add_weight(name="key", shape=shape, initializer="glorot_uniform")
        self.value = self.add_weight(name="value", shape=shape, initializer="glorot_uniform")

    def _split_heads(self, x, kernel):
        """(batch, length, dim) @ kernel -> (batch, heads, length, head_dim)."""
        y = ops.matmul(x, kernel)
        y = ops.reshape(y, (ops.shape(x)[0], -1, self.heads, self.head_dim))
        return ops.transpose(y, (0, 2, 1, 3))

    def _attend(self, q, k, v, allowed):
        """q (b, h, n, d), k/v (b, h, m, d), allowed broadcastable to (b, h, n, m)."""
        q = q / ops.cast(self.head_dim ** 0.5, q.dtype)  # on q, not on the (n, m) scores: less memory
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        scores = ops.where(allowed, scores, ops.cast(_mask_value(scores.dtype), scores.dtype))
        out = ops.matmul(ops.softmax(scores, axis=-1), v)  # (b, h, n, d)
        out = ops.transpose(out, (0, 2, 1, 3))
        return ops.reshape(out, (ops.shape(q)[0], -1, self.heads * self.head_dim))

    def call(self, x):
        q, k, v = (self._split_heads(x, w) for w in (self.query, self.key, self.value))
        n = x.shape[1]
        if n is None or n <= QUERY_CHUNK:
            return self._causal(q, k, v, 0)
        # Long, static sequences (training): queries in chunks, each against only the keys it may
        # see, recomputed in the backward pass. The (n, n) scores are never all held at once.
        chunks = []
        for i in range(0, n, QUERY_CHUNK):
            causal = keras.remat(lambda q, k, v, offset=i: self._causal(q, k, v, offset))
            chunks.append(causal(q[:, :, i:i + QUERY_CHUNK], k[:, :, :i + QUERY_CHUNK], v[:, :, :i + QUERY_CHUNK]))
        return ops.concatenate(chunks, axis=1)

    def _causal(self, q, k, v, offset):
        """Queries at positions offset.. attend to keys at positions 0..their own."""
        rows = ops.arange(ops.shape(q)[2]) + offset
        allowed = ops.expand_dims(rows, 1) >= ops.expand_dims(ops.arange(ops.shape(k)[2]), 0)
        return self._attend(q, k, v, allowed)

    def step(self, x, cache_k, cache_v, index):
        """One position. x (batch, 1, dim); caches (batch, heads, max_length, head_dim) hold the keys
        and values of positions < index. Returns (output (batch, 1, heads*head_dim), new caches)."""
        q, k, v = (self._split_heads(x, w) for w in (self.query, self.key, self.value))
        start = [0, 0, index, 0]
        cache_k = ops.slice_update(cache_k, start, ops.cast(k, cache_k.dtype))
        cache_v = ops.slice_update(cache_v, start, ops.cast(v, cache_v.dtype))
        allowed = ops.arange(ops.shape(cache_k)[2]) <= index  # (max_length,)
        return self._attend(q, cache_k, cache_v, allowed), cache_k, cache_v

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.heads * self.head_dim)

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "head_dim": self.head_dim}
