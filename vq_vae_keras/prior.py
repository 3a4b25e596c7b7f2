"""The attention prior over code maps (the reference's c_model, "PixelAtt"), and its layers.

A code map (h, w) is flattened row-major, shifted by +1 and given a start token 0:
tokens (h*w + 1,). The model reads tokens[:, :-1] and predicts the codes tokens[:, 1:] - 1.

One forward pass, two ways to run it (as KerasHub's causal models do): on a whole sequence
(training, `Prior.__call__`), and on new positions against a key/value cache per block
(sampling, `Prior.call_with_cache`). Both go through the same layers' `call`.
"""

import keras
import numpy as np
from keras import layers, ops

from .config import Config
from .errors import UsageError
from .models import seeded_initializers

PACKAGE = "vq_vae_keras"
START_TOKEN = 0
# The reference's third-party LayerNormalization used epsilon = K.epsilon() ** 2.
LAYER_NORM_EPSILON = 1e-14
# Query positions per attention chunk on long sequences: bounds the scores held per block.
QUERY_CHUNK = 256


def codes_to_tokens(codes, start=START_TOKEN):
    """(N, h, w) codes -> (N, h*w + 1) int32 tokens: the start token (one for all, or (N,) of
    them: see class_tokens), then code + 1."""
    codes = np.asarray(codes, np.int32)
    flat = codes.reshape(len(codes), -1)
    first = np.broadcast_to(np.asarray(start, np.int32), (len(codes),))[:, None]
    return np.concatenate([first, flat + 1], axis=1)


def class_tokens(classes, num_codes):
    """Class ids (N,) -> the start tokens of a class-conditional prior: num_codes + 1 + class.
    Token 0 stays the unconditional start (no class)."""
    return np.asarray(classes, np.int32) + num_codes + 1


def class_vectors(embedding, classes):
    """An Embedding's vectors of class ids (...), -1 for none -> (..., dim), zero for none (the
    class-free positions of both prior kinds)."""
    known = ops.cast(classes >= 0, embedding.compute_dtype)[..., None]
    return embedding(ops.maximum(classes, 0)) * known


def split_class_tokens(tokens, num_codes):
    """int tokens (batch, n) -> (tokens with each class token made the start token 0, class ids
    (batch, n): the class of a class token, -1 elsewhere)."""
    is_class = tokens > num_codes
    return ops.where(is_class, START_TOKEN, tokens), ops.where(is_class, tokens - (num_codes + 1), -1)


def tokens_to_codes(tokens, grid_shape):
    """(N, h*w + 1) tokens -> (N, h, w) codes."""
    return (np.asarray(tokens, np.int32)[:, 1:] - 1).reshape(-1, *grid_shape)


def check_codes(codes, config: Config, source="codes"):
    h, w = config.grid_shape
    if codes.ndim != 3 or codes.shape[1:] != (h, w) or len(codes) == 0:
        raise UsageError(f"{source} has shape {codes.shape}, this run needs (N, {h}, {w})")
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= config.num_codes:
        raise UsageError(f"{source} must hold integer codes in [0, {config.num_codes})")
    return codes.astype(np.int32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GridPositionEmbedding(keras.layers.Layer):
    """Adds a learned row and column embedding to a flattened (row-major) grid sequence.

    Input (batch, length, dim) holding positions start..start+length-1 of the grid (start 0 for
    a whole sequence, the cache index when sampling); position p has row p // width and column
    p % width (the reference's two Embedding layers on Lambda-made position ids).
    """

    def __init__(self, height, width, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = height, width

    def build(self, input_shape):
        init = keras.initializers.RandomUniform(-0.05, 0.05)  # Embedding's default
        dim = input_shape[-1]
        self.rows = self.add_weight(name="rows", shape=(self.height, dim), initializer=init)
        self.cols = self.add_weight(name="cols", shape=(self.width, dim), initializer=init)

    def call(self, x, start=0):
        p = ops.arange(ops.shape(x)[1]) + start
        position = ops.take(self.rows, p // self.width, axis=0) + ops.take(self.cols, p % self.width, axis=0)
        return x + ops.expand_dims(position, 0)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


def _mask_value(dtype):
    # Large enough that exp() underflows to 0, small enough to stay finite in float16.
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalSelfAttention(keras.layers.Layer):
    """Masked multi-head self-attention as in the reference's `Attention(8, 32, mask_right=True)`:
    q, k, v projections without bias, no output projection, position i attends to 0..i.

    call(x) -> (batch, length, heads * head_dim), for x (batch, length, dim) a whole sequence.
    call(x, cache, cache_update_index) -> (output, cache): x holds the positions
      cache_update_index.. (usually one); cache is (keys, values), keys (batch * heads, head_dim,
      max_length) and values (batch * heads, max_length, head_dim), holding the earlier positions.
      Their keys and values are written into the cache, and they attend to every cached position
      up to their own.

    Inside, heads share one batch axis and keys are transposed, so that q.k and p.v are plain
    batched matmuls. In the compiled sampler this lets XLA update the caches in place: with a
    (batch, heads) pair of axes it copied every cache at every position, 5x slower at 32x32.
    """

    def __init__(self, heads=8, head_dim=32, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_dim = heads, head_dim

    def build(self, input_shape):
        shape = (input_shape[-1], self.heads * self.head_dim)
        self.query = self.add_weight(name="query", shape=shape, initializer="glorot_uniform")
        self.key = self.add_weight(name="key", shape=shape, initializer="glorot_uniform")
        self.value = self.add_weight(name="value", shape=shape, initializer="glorot_uniform")

    def call(self, x, cache=None, cache_update_index=None):
        q, keys, values = self._project(x)
        batch = ops.shape(x)[0]
        if cache is not None:
            cached_keys, cached_values = cache
            keys = ops.slice_update(cached_keys, [0, 0, cache_update_index], ops.cast(keys, cached_keys.dtype))
            values = ops.slice_update(cached_values, [0, cache_update_index, 0], ops.cast(values, cached_values.dtype))
            return self._causal(q, keys, values, cache_update_index, batch), (keys, values)
        n = x.shape[1]
        if n is None or n <= QUERY_CHUNK:
            return self._causal(q, keys, values, 0, batch)
        # Long, static sequences (training): queries in chunks, each against only the keys it may
        # see, recomputed in the backward pass. The (n, n) scores are never all held at once.
        chunks = []
        for i in range(0, n, QUERY_CHUNK):
            causal = keras.remat(lambda q, k, v, offset=i: self._causal(q, k, v, offset, batch))
            chunks.append(causal(q[:, i:i + QUERY_CHUNK], keys[:, :, :i + QUERY_CHUNK], values[:, :i + QUERY_CHUNK]))
        return ops.concatenate(chunks, axis=1)

    def _project(self, x):
        """(batch, n, dim) -> q (batch * heads, n, head_dim), keys (batch * heads, head_dim, n),
        values (batch * heads, n, head_dim), from one fused matmul."""
        qkv = ops.matmul(x, ops.concatenate([self.query, self.key, self.value], axis=1))
        qkv = ops.reshape(qkv, (ops.shape(x)[0], -1, 3 * self.heads, self.head_dim))
        q, k, v = ops.split(ops.transpose(qkv, (0, 2, 1, 3)), 3, axis=1)  # each (batch, heads, n, head_dim)
        merge = lambda t: ops.reshape(t, (-1, ops.shape(t)[2], self.head_dim))  # noqa: E731
        return merge(q), ops.transpose(merge(k), (0, 2, 1)), merge(v)

    def _causal(self, q, keys, values, offset, batch):
        """Queries (batch * heads, n, d) at positions offset.. attend to keys (batch * heads, d, m)
        and values (batch * heads, m, d) at 0..their own. Returns (batch, n, heads * d)."""
        q = q / ops.cast(self.head_dim ** 0.5, q.dtype)  # on q, not on the (n, m) scores: less memory
        scores = ops.matmul(q, ops.cast(keys, q.dtype))
        rows = ops.arange(ops.shape(q)[1]) + offset
        allowed = ops.expand_dims(rows, 1) >= ops.expand_dims(ops.arange(ops.shape(keys)[2]), 0)
        scores = ops.where(allowed, scores, ops.cast(_mask_value(scores.dtype), scores.dtype))
        out = ops.matmul(ops.softmax(scores, axis=-1), ops.cast(values, q.dtype))  # (batch * heads, n, d)
        out = ops.reshape(out, (batch, self.heads, -1, self.head_dim))
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (batch, -1, self.heads * self.head_dim))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.heads * self.head_dim)

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "head_dim": self.head_dim}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Prior(keras.Model):
    """The reference's c_model, a functional model: int tokens (batch, length <= height * width),
    0 = start token, code k = token k + 1 -> (batch, length, num_codes) next-code probabilities.

    Each block: causal attention -> Dense(relu) -> add the block's input -> LayerNorm.
    `call_with_cache` runs the same layers on new positions against per-block key/value caches.
    The layers (and so the weight file's layout) are those of the earlier `build_prior`.
    With class names (a class-conditional prior, a departure), a learned class embedding is added
    to the start token's: the sequence starts with class c's token num_codes + 1 + c.
    """

    def __init__(self, height, width, num_codes, dim=256, heads=8, head_dim=32, depth=4, classes=None, name="prior",
                 **kwargs):
        self.height, self.width, self.num_codes = height, width, num_codes
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, head_dim, depth
        self.classes = tuple(classes) if classes else None  # a tuple: Keras does not track it
        self.token_embedding = layers.Embedding(num_codes + 1, dim, name="token_embedding")
        if self.classes:
            self.class_embedding = layers.Embedding(len(self.classes), dim, name="class_embedding")
        self.position_embedding = GridPositionEmbedding(height, width, name="position_embedding")
        self.embedding_norm = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="embedding_norm")
        self.blocks = [(CausalSelfAttention(heads, head_dim, name=f"block{i}_attention"),
                        layers.Dense(dim, activation="relu", name=f"block{i}_dense"),
                        layers.Add(name=f"block{i}_add"),
                        layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"block{i}_norm"))
                       for i in range(depth)]
        self.next_code = layers.Dense(num_codes, name="next_code")
        self.softmax = layers.Softmax(name="next_code_probabilities")
        tokens = keras.Input((None,), dtype="int32", name="tokens")
        logits, _ = self.call_with_cache(tokens)
        super().__init__(tokens, self.softmax(logits), name=name, **kwargs)

    def call_with_cache(self, tokens, caches=None, index=0):
        """tokens (batch, n) at positions index..index+n-1 -> (logits (batch, n, num_codes), caches).

        caches: None for a whole sequence from position 0, or one (keys, values) pair per block
        (see `empty_caches`) holding the positions before index; the new positions are written in.
        """
        if self.classes:
            tokens, classes = split_class_tokens(tokens, self.num_codes)
            x = self.token_embedding(tokens) + class_vectors(self.class_embedding, classes)
        else:
            x = self.token_embedding(tokens)
        x = self.position_embedding(x, start=index)
        x = self.embedding_norm(x)
        new_caches = []
        for i, (attention, dense, add, norm) in enumerate(self.blocks):
            if caches is None:
                a = attention(x)
            else:
                a, cache = attention(x, cache=caches[i], cache_update_index=index)
                new_caches.append(cache)
            x = norm(add([dense(a), x]))
        return self.next_code(x), new_caches

    def empty_caches(self, batch, length):
        """Zero caches for `call_with_cache`: one (keys, values) pair per block, keys
        (batch * heads, head_dim, length), values (batch * heads, length, head_dim)."""
        keys, values = (batch * self.heads, self.head_dim, length), (batch * self.heads, length, self.head_dim)
        return [(ops.zeros(keys, self.compute_dtype), ops.zeros(values, self.compute_dtype))
                for _ in range(self.depth)]

    def get_config(self):
        return {"height": self.height, "width": self.width, "num_codes": self.num_codes, "dim": self.dim,
                "heads": self.heads, "head_dim": self.head_dim, "depth": self.depth, "classes": list(self.classes or ()) or None,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_prior(config: Config) -> keras.Model:
    """The config's prior (attention, the reference, or pixelcnn): int tokens (batch, length <= h*w)
    -> (batch, length, num_codes) next-code probabilities. The initial weights follow the prior's
    seed (config.prior_seed, else config.seed)."""
    config.validate()
    with seeded_initializers(config.seed if config.prior_seed is None else config.prior_seed):
        if config.prior == "pixelcnn":
            from .pixelcnn import build_pixelcnn

            return build_pixelcnn(config)
        h, w = config.grid_shape
        return Prior(h, w, config.num_codes, config.prior_dim, config.prior_heads, config.prior_head_dim,
                     config.prior_depth, config.classes)


def prior_nll(prior, tokens, batch_size=32):
    """Mean negative log-likelihood per code, in nats, of (N, L+1) token sequences."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size]
        probs = keras.ops.convert_to_numpy(prior(batch[:, :-1], training=False))
        p = np.take_along_axis(probs, (batch[:, 1:] - 1)[..., None], axis=-1)
        total += float(-np.log(np.maximum(p, 1e-12)).sum())
        count += p.size
    return total / max(count, 1)
