"""The attention prior over code maps (the reference's c_model, "PixelAtt"), its layers and its
cached sampler. Tokens in, next-code probabilities out: see tokens.py.

One forward pass, two ways to run it (as KerasHub's causal models do): on a whole sequence
(training, `Prior.__call__`), and on new positions against a key/value cache per block
(sampling, `Prior.call_with_cache`). Both go through the same layers' `call`.

Sampling (`CachedSampler`) costs one token's work per position, where the reference reruns the
whole prefix for every new position. All positions run inside one XLA-compiled function (caches
updated in place, no Python between positions), compiled once per prior and batch size. The
distributions are those of the full model, to float rounding.

Sampling is bound by reading the caches, so the sequence is cut into a few segments, one loop
each, and in each the caches are only as long as the segment's end: a position attends over about
its prefix rather than over all h*w slots. The loops live in one compiled function, so that they
share one trace and one XLA compilation (more segments would read less padding but compile
longer). On a CPU, long maps are sampled one per thread at a time: one sample's caches stay in
the processor's cache, a batch's do not.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from .. import backend
from .condition import TopCondition
from .sampling import Sampler, draw, draw_numpy
from .tokens import PACKAGE, START_TOKEN, class_tokens, class_vectors, split_class_tokens

# The reference's third-party LayerNormalization used epsilon = K.epsilon() ** 2.
LAYER_NORM_EPSILON = 1e-14
# Query positions per attention chunk on long sequences: bounds the scores held per block.
QUERY_CHUNK = 256


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
    (batch, heads) pair of axes it copies every cache at every position.
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
    """The reference's c_model: int tokens (batch, length <= height * width), 0 = start token,
    code k = token k + 1 -> (batch, length, num_codes) next-code probabilities.

    Each block: causal attention -> Dense(relu) -> add the block's input -> LayerNorm.
    `call_with_cache` runs the same layers on new positions against per-block key/value caches.
    A functional model (its graph built in __init__), where PixelCNN subclasses `call`: Keras
    writes a functional model's weights under its layers in graph order, a subclassed one's under
    its attribute names (and loads a file of the other layout with only a warning), and the weight
    files already written are those of the earlier functional `build_prior`.
    With class names (a class-conditional prior, a departure), a learned class embedding is added
    to the start token's: the sequence starts with class c's token num_codes + 1 + c.
    With condition = (top height, top width, top codes) (the bottom prior of a two-level run, a
    departure), the inputs are [tokens (batch, height * width), top codes (batch, top height * top
    width)]: whole sequences only, each position given the top map's vectors (TopCondition).
    """

    def __init__(self, height, width, num_codes, dim=256, heads=8, head_dim=32, depth=4, classes=None, name="prior",
                 condition=None, **kwargs):
        self.height, self.width, self.num_codes = height, width, num_codes
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, head_dim, depth
        self.classes = tuple(classes) if classes else None  # a tuple: Keras does not track it
        self.condition = tuple(condition) if condition else None
        self.token_embedding = layers.Embedding(num_codes + 1, dim, name="token_embedding")
        if self.condition:
            self.top_condition = TopCondition(*self.condition, dim, name="top_condition")
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
        if self.condition:
            tokens = keras.Input((height * width,), dtype="int32", name="tokens")
            top_codes = keras.Input((self.condition[0] * self.condition[1],), dtype="int32", name="top_codes")
            logits, _ = self.call_with_cache(tokens, condition=self.top_condition(top_codes))
            super().__init__([tokens, top_codes], self.softmax(logits), name=name, **kwargs)
            return
        tokens = keras.Input((None,), dtype="int32", name="tokens")
        logits, _ = self.call_with_cache(tokens)
        super().__init__(tokens, self.softmax(logits), name=name, **kwargs)

    def __setattr__(self, name, value):
        # Its layers are made before the functional model's __init__, which PyTorch's Module refuses
        # ("cannot assign module before Module.__init__() call"); the graph tracks them for Keras.
        if keras.backend.backend() == "torch" and "_modules" not in vars(self):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def call_with_cache(self, tokens, caches=None, index=0, condition=None):
        """tokens (batch, n) at positions index..index+n-1 -> (logits (batch, n, num_codes), caches).

        caches: None for a whole sequence from position 0, or one (keys, values) pair per block
        (see `empty_caches`) holding the positions before index; the new positions are written in.
        condition: a conditioned prior's TopCondition vectors of every position (batch, h * w, dim).
        """
        if self.classes:
            tokens, classes = split_class_tokens(tokens, self.num_codes)
            x = self.token_embedding(tokens) + class_vectors(self.class_embedding, classes)
        else:
            x = self.token_embedding(tokens)
        if condition is not None:
            if caches is not None:  # these positions' vectors
                condition = ops.slice(condition, [0, index, 0], [ops.shape(x)[0], ops.shape(x)[1], self.dim])
            x = x + ops.cast(condition, x.dtype)
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

    def sampler(self):
        """This prior's `CachedSampler`, made on first use and kept for the prior's lifetime."""
        return CachedSampler.of(self)

    def get_config(self):
        config = {"height": self.height, "width": self.width, "num_codes": self.num_codes, "dim": self.dim,
                  "heads": self.heads, "head_dim": self.head_dim, "depth": self.depth,
                  "classes": list(self.classes or ()) or None, "name": self.name}
        if self.condition:
            config["condition"] = list(self.condition)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# Segments per sequence, and their least length: more segments attend over less padding, but
# each adds a loop to compile.
SEGMENTS = 4
MIN_SEGMENT = 64


def segments(length):
    """[(start, stop), ...] covering 0..length: SEGMENTS pieces of at least MIN_SEGMENT positions."""
    size = max(MIN_SEGMENT, math.ceil(length / SEGMENTS))
    return [(start, min(start + size, length)) for start in range(0, length, size)]


class CachedSampler(Sampler):
    """The attention prior's sampler: `compiled` draws a whole sequence, position by position,
    through `Prior.call_with_cache`."""

    def __init__(self, prior):
        super().__init__(prior)
        self.length = prior.height * prior.width
        # Samples per batch on a CPU: one for maps of 256 positions or more (one sample's caches
        # stay in the processor's cache), else 16 (short maps are bound by per-step overhead, which
        # a batch shares). Speed alone: the codes do not depend on the batch size (sampling.noise).
        self.cpu_batch_size = 1 if self.length >= 256 else 16

    def compiled(self, token, seed, temperature, top_k, top_p, *top_codes):
        """(batch, length) codes after the start tokens (batch,): one while_loop per segment, the
        caches grown between them. top_codes: a conditioned prior's (batch, top length), else none
        (not even None: the function's signature stays the unconditioned prior's)."""
        prior = self.model
        batch = token.shape[0]
        condition = prior.top_condition(*top_codes) if top_codes else None  # once, for every position
        caches = prior.empty_caches(batch, 0)
        codes = tf.zeros((batch, self.length), tf.int32)

        # One position, traced once for all the segments (not once per loop): the caches' length
        # is left open here, and each loop's XLA compilation sees its own.
        open_length = [(tf.TensorSpec((*keys.shape[:2], None), keys.dtype),
                        tf.TensorSpec((values.shape[0], None, values.shape[2]), values.dtype)) for keys, values in caches]

        @tf.function(autograph=False, input_signature=[tf.TensorSpec((), tf.int32), tf.TensorSpec((batch,), tf.int32),
                                                       open_length, tf.TensorSpec(codes.shape, tf.int32)])
        def position(i, token, caches, codes):
            logits, caches = prior.call_with_cache(token[:, None], caches, i, condition)
            code = draw(logits[:, 0], temperature, top_k, top_p, seed, i)
            return i + 1, code + 1, caches, ops.slice_update(codes, [0, i], code[:, None])

        def body(i, token, caches, codes):
            i, token, new_caches, codes = position(i, token, caches, codes)
            for new, old in zip(tf.nest.flatten(new_caches), tf.nest.flatten(caches)):
                new.set_shape(old.shape)
            return i, token, new_caches, codes

        for start, stop in segments(self.length):
            more = [0, stop - start]  # keys (batch * heads, dim, length), values (batch * heads, length, dim)
            caches = [(tf.pad(keys, [[0, 0], [0, 0], more]), tf.pad(values, [[0, 0], more, [0, 0]]))
                      for keys, values in caches]
            state = (tf.constant(start), token, caches, codes)
            _, token, caches, codes = tf.while_loop(lambda i, *_: i < stop, body, state)
        return codes

    def sample_eagerly(self, start, seed, temperature, top_k, top_p, top_codes=None):
        """`compiled`'s loop on the JAX and PyTorch backends: the same layers, position by position
        against caches of the whole length (`position`), each code drawn in NumPy (draw_numpy)."""
        prior, batch = self.model, len(start)
        token, codes = np.asarray(start, np.int32), np.zeros((batch, self.length), np.int32)
        position = self.position()
        with backend.no_grad():
            condition = None if top_codes is None else prior.top_condition(np.reshape(top_codes, (batch, -1)))
            caches = prior.empty_caches(batch, self.length)
            for i in range(self.length):
                logits, caches = position(ops.convert_to_tensor(token[:, None]), caches, i, condition)
                codes[:, i] = draw_numpy(ops.convert_to_numpy(logits), temperature, top_k, top_p, seed, i)
                token = codes[:, i] + 1
        return codes

    def position(self):
        """(tokens (batch, 1), caches, i, condition) -> (logits (batch, num_codes), caches): one
        position through Prior.call_with_cache. Under JAX one jax.jit program for every position,
        its weights passed in (the KerasHub pattern: a stateless call), so new weights reuse it;
        under PyTorch eager."""
        if backend.name() != "jax":
            def eager(tokens, caches, i, condition):
                logits, caches = self.model.call_with_cache(tokens, caches, i, condition)
                return logits[:, 0], caches
            return eager
        if getattr(self, "_jax_position", None) is None:
            import jax

            def stateless(values, tokens, caches, i, condition):
                prior = self.model  # read when traced: the sampler keeps its prior weakly
                with keras.StatelessScope(state_mapping=list(zip(prior.variables, values))):
                    logits, caches = prior.call_with_cache(tokens, caches, i, condition)
                return logits[:, 0], caches

            self._jax_position = jax.jit(stateless)
        values = [variable.value for variable in self.model.variables]
        return lambda tokens, caches, i, condition: self._jax_position(values, tokens, caches, np.int32(i), condition)

    def sample(self, batch, seed, temperature, top_k, top_p, classes=None, top_codes=None):
        prior = self.model
        start = START_TOKEN if classes is None else class_tokens(classes, prior.num_codes)
        if not self.compiles:
            return self.sample_eagerly(np.broadcast_to(start, (batch,)), seed, temperature, top_k, top_p, top_codes)
        token = tf.constant(np.broadcast_to(start, (batch,)), tf.int32)
        options = (tf.constant(seed, tf.int64), tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                   tf.constant(top_p, tf.float32))
        if top_codes is not None:
            return self.call(token, *options, tf.constant(np.reshape(top_codes, (batch, -1)), tf.int32)).numpy()
        return self.call(token, *options).numpy()
