"""Fast autoregressive sampling from the prior with a key/value cache.

The reference reruns the whole prefix for every new position (O(L^2) work and one predict call
per position). Here each position costs one token's work: the prior's own layers run through
`Prior.call_with_cache`, every attention block keeping the keys and values of earlier positions
in a cache. All positions run inside one XLA-compiled function (caches updated in place, no Python
between positions), compiled once per prior and batch size and reused by every later call: seeds,
temperature, top-k and top-p are tensors. The distributions are those of the full model, to float
rounding.

Sampling is bound by reading the caches, so the sequence is cut into a few segments, one loop
each, and in each the caches are only as long as the segment's end: a position attends over about
its prefix rather than over all h*w slots. The loops live in one compiled function: one trace and
one XLA compilation, about half the time that a function per segment took (more segments would
read less padding but compile longer). On a CPU, maps of 256 positions or more are sampled one
per thread at a time: one sample's caches (8 MB at 32x32) stay in the processor's cache, a
batch's do not (a batch of 4 was 2x slower a sample at 32x32).
"""

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

from .errors import UsageError
from .pixelcnn import PixelCNN
from .pixelcnn import compiled_sampler as pixelcnn_sampler
from .prior import START_TOKEN, Prior, class_tokens

# Segments per sequence, and their least length: more segments attend over less padding, but
# each adds a loop to compile.
SEGMENTS = 4
MIN_SEGMENT = 64

_samplers = weakref.WeakKeyDictionary()


def compiled_sampler(prior):
    """The `Sampler` of a prior, built on first use and kept for the prior's lifetime."""
    if prior not in _samplers:
        _samplers[prior] = Sampler(prior)
    return _samplers[prior]


def segments(length):
    """[(start, stop), ...] covering 0..length: SEGMENTS pieces of at least MIN_SEGMENT positions."""
    size = max(MIN_SEGMENT, math.ceil(length / SEGMENTS))
    return [(start, min(start + size, length)) for start in range(0, length, size)]


class Sampler:
    """The compiled sampling function of one prior, traced once per batch size on first use;
    later calls with any seed or sampling option reuse it."""

    def __init__(self, prior):
        self._prior = weakref.ref(prior)  # the sampler must not keep its prior alive
        self.length = prior.height * prior.width
        # Samples per batch on a CPU: one for maps of 256 positions or more (one sample's caches
        # stay in the processor's cache), else 16 (short maps are bound by per-step overhead, which
        # a batch shares). Not a share of the cores: a seed gives the same codes on every CPU.
        self.cpu_batch_size = 1 if self.length >= 256 else 16
        self.function = tf.function(self._draw, jit_compile=True, autograph=False)

    def tracing_count(self):
        return self.function.experimental_get_tracing_count()

    def _draw(self, token, seed, temperature, top_k, top_p):
        """(batch, length) codes after the start tokens (batch,): one while_loop per segment, the
        caches grown between them."""
        prior = self._prior()
        batch = token.shape[0]
        caches = prior.empty_caches(batch, 0)
        codes = tf.zeros((batch, self.length), tf.int32)

        # One position, traced once for all the segments: the caches' length is left open here,
        # and each loop's XLA compilation sees its own (at 32x32 tracing took 1.9 s per loop, 0.7 s once).
        open_length = [(tf.TensorSpec((*keys.shape[:2], None), keys.dtype),
                        tf.TensorSpec((values.shape[0], None, values.shape[2]), values.dtype)) for keys, values in caches]

        @tf.function(autograph=False, input_signature=[tf.TensorSpec((), tf.int32), tf.TensorSpec((batch,), tf.int32),
                                                       open_length, tf.TensorSpec(codes.shape, tf.int32)])
        def position(i, token, caches, codes):
            logits, caches = prior.call_with_cache(token[:, None], caches, i)
            code = draw(logits[:, 0], temperature, top_k, top_p, tf.stack([seed[0], seed[1] + tf.cast(i, tf.int64)]))
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

    def sample(self, batch, seed, temperature, top_k, top_p, classes=None):
        """(batch, length) int32 codes; seed is a pair of ints; classes (batch,) ints or None. batch
        is a Python int: one trace per batch size."""
        prior = self._prior()
        start = START_TOKEN if classes is None else class_tokens(classes, prior.num_codes)
        token = tf.constant(np.broadcast_to(start, (batch,)), tf.int32)
        options = (tf.constant(seed, tf.int64), tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                   tf.constant(top_p, tf.float32))
        return self.function(token, *options).numpy()


def draw(logits, temperature, top_k, top_p, seed):
    """One code per row of logits (batch, K) from softmax(logits / temperature), restricted to the
    top_k likeliest codes, then to the nucleus: the fewest likeliest codes whose probability (after
    top-k) reaches top_p. Codes tied with the last one kept are kept too.

    Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits), and unlike
    tf.random.categorical it compiles with XLA. The options are tensors: changing them does not
    recompile; the sort runs only when an option restricts the draw.
    """
    logits = tf.cast(logits, tf.float32) / temperature
    num_codes = tf.shape(logits)[-1]

    def restrict():
        ranked = tf.sort(logits, direction="DESCENDING")
        in_top_k = tf.range(num_codes) < top_k
        probs = tf.nn.softmax(tf.where(in_top_k, ranked, -np.inf), axis=-1)
        before = tf.math.cumsum(probs, axis=-1, exclusive=True)  # probability of the likelier codes
        kept = tf.reduce_sum(tf.cast(in_top_k & (before < top_p), tf.int32), axis=-1)  # >= 1
        threshold = tf.gather(ranked, kept - 1, axis=-1, batch_dims=1)[:, None]
        return tf.where(logits < threshold, tf.constant(-np.inf, tf.float32), logits)

    logits = tf.cond((top_k < num_codes) | (top_p < 1.0), restrict, lambda: logits)
    uniform = tf.random.stateless_uniform(tf.shape(logits), seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return tf.cast(tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1), tf.int32)


def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x):
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def check_sampling_options(prior, n, grid_shape, temperature, top_k, top_p, seed=None, batch_size=None):
    """UsageError (a ValueError) naming the first bad argument of `sample_codes`."""
    if not isinstance(prior, (Prior, PixelCNN)):
        raise UsageError(f"sample_codes needs a prior made by build_prior, got {type(prior).__name__}")
    if not is_int(n) or n < 1:
        raise UsageError(f"n must be an integer >= 1, got {n!r}", "n")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**63):
        raise UsageError(f"seed must be None or an integer >= 0, got {seed!r}", "seed")
    if batch_size is not None and not (is_int(batch_size) and batch_size >= 1):
        raise UsageError(f"batch_size must be None or an integer >= 1, got {batch_size!r}", "batch_size")
    if not (is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}", "temperature")
    if top_k is not None and not (is_int(top_k) and 1 <= top_k <= prior.num_codes):
        raise UsageError(f"top_k must be an integer in [1, {prior.num_codes}], got {top_k!r}", "top_k")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if not isinstance(grid_shape, (tuple, list)) or tuple(grid_shape) != (prior.height, prior.width):
        raise UsageError(f"grid_shape {grid_shape!r} does not match the prior's {prior.height}x{prior.width}", "grid_shape")


def sample_classes(prior, n, classes):
    """The class id of each of n samples: classes is None, a class (name or id) or n of them.
    None on a class-conditional prior: every class in turn, in equal consecutive blocks."""
    names = prior.classes
    if names is None:
        if classes is not None:
            raise UsageError("classes: this prior is not class-conditional (train it with --classes)")
        return None
    if classes is None:
        return np.arange(n) * len(names) // n
    if isinstance(classes, (str, int, np.integer)):
        classes = [classes] * n
    if not isinstance(classes, (list, tuple, np.ndarray)) or len(classes) != n:
        raise UsageError(f"classes: give one class or a list of {n} (one per sample), got {classes!r}")
    ids = []
    for c in classes:
        if isinstance(c, str) and c in names:
            ids.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(names):
            ids.append(int(c))
        else:
            raise UsageError(f"unknown class {c!r}; this prior's classes are {', '.join(names)}")
    return np.array(ids, np.int32)


def default_batch_size(sampler, n):
    """Samples per batch when sample_codes is given none: all n at once on a GPU, the sampler's
    `cpu_batch_size` on a CPU (never more than n)."""
    return n if tf.config.list_logical_devices("GPU") else min(sampler.cpu_batch_size, n)


def sample_codes(prior, n, grid_shape, temperature=1.0, top_k=None, seed=None, top_p=None, batch_size=None,
                 progress=False, classes=None):
    """n code maps (n, h, w) int32 drawn from the prior, position by position.

    temperature=1, top_k=None and top_p=None is the reference's plain sampling; other values are
    departures. The same seed (and batch_size) gives the same codes; seed=None draws a fresh one.
    classes (class-conditional priors): a class name or id for all samples, or one per sample;
    None: every class in turn, in equal consecutive blocks.
    Samples run in batches of batch_size, in parallel on the CPU cores; the last is padded so that
    all share one compiled loop. Default (`default_batch_size`): all n at once on a GPU; on a CPU
    one sample per batch for maps of 256 positions or more, else 16.
    """
    check_sampling_options(prior, n, grid_shape, temperature, top_k, top_p, seed, batch_size)
    h, w = grid_shape
    ids = sample_classes(prior, n, classes)
    sampler = pixelcnn_sampler(prior) if isinstance(prior, PixelCNN) else compiled_sampler(prior)
    length = h * w
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    batch = default_batch_size(sampler, n) if batch_size is None else min(batch_size, n)
    bar = tqdm(total=n * h * w, desc="sampling", unit="code", disable=not progress)

    def one_batch(index):
        # Each batch's noise comes from its own stream: seed, then batch index * length + position.
        rows = None if ids is None else np.resize(ids[index * batch:(index + 1) * batch], batch)  # last: padded
        codes = sampler.sample(batch, (seed, index * length), float(temperature), top_k or prior.num_codes,
                               1.0 if top_p is None else float(top_p), classes=rows)
        bar.update(min(batch, n - index * batch) * h * w)  # the last batch's padding is not progress
        return codes

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        codes = np.concatenate(list(pool.map(one_batch, range(-(-n // batch)))))[:n]
    bar.close()
    return codes.reshape(n, h, w)
