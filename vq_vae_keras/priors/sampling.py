"""Drawing code maps from a prior, position by position: `sample_codes`, and what every prior's
sampler shares (`Sampler`, the protocol; `draw`, one code per row of logits).

Each prior kind hands out its own compiled sampler (`prior.sampler()`), which runs the prior's
own layers one position at a time and draws each code with `draw`; so this module knows no prior
kind. A prior, to `sample_codes`, is anything with `height`, `width`, `num_codes`, `classes`
(names, or None) and `sampler()`.

`use_compile_cache` keeps XLA's compiled samplers on disk, so that a new process (each
`sample.py` call) loads the program instead of compiling it again.
"""

import glob
import hashlib
import math
import os
import platform
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .. import __version__, backend
from ..errors import UsageError, one_trace_per_object, warn

_samplers = weakref.WeakKeyDictionary()

CACHE_ENV = "VQK_XLA_CACHE"  # a folder for use_compile_cache's root; 0: no cache
_cache_folder = None  # the folder use_compile_cache turned on in this process
_cache_lock = threading.Lock()


def machine_key():
    """What TensorFlow's cache key lacks: its entries are native code for this processor (and
    GPU), in this TensorFlow's format. Its key has only the device type and the program (the
    variables are its parameters, not constants: new weights reuse an entry), whose function
    names carry the process's count of traced functions: the same command on the same run
    repeats them, another script writes its own entries."""
    hardware = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            hardware += sorted({line for line in f if line.startswith(("model name", "flags"))})
    except OSError:
        pass
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(path) as f:
            hardware.append(f.readline())  # "Model: NVIDIA H100 ..."
    digest = hashlib.sha256("\n".join(hardware).encode()).hexdigest()[:12]
    return f"tf{tf.__version__}-vqk{__version__}-{digest}"


def use_compile_cache(root, now=False):
    """Keep the XLA programs this process compiles in a subfolder of root (one per TensorFlow,
    package version and machine: `machine_key`) and load them from there instead of compiling
    them again. Returns the folder, or None when off.

    TensorFlow reads its XLA flags once, when it first creates its devices: call this after
    importing TensorFlow and before its first op (building a model is one), as `sample.py` does
    (and this module, when imported, for VQK_XLA_CACHE; a Sampler is made too late for it).
    The environment decides first: VQK_XLA_CACHE (a folder for root; 0: off), then a
    TF_XLA_FLAGS that names its own --tf_xla_persistent_cache_directory (theirs is kept). A
    folder that cannot be written turns the cache off with one warning (TensorFlow would fail
    the compilation that it cannot save). Entries are written whole (a temporary file, then a
    rename), so processes may share a folder. Deleting the folder is always safe.
    now: have TensorFlow read its flags now (it creates its devices) and put TF_XLA_FLAGS back as
    it was, so that the cache is this process's only, not its children's nor its callers'.
    """
    global _cache_folder
    root = os.environ.get(CACHE_ENV, root)
    previous = os.environ.get("TF_XLA_FLAGS")
    flags = previous or ""
    if not root or root == "0" or "--tf_xla_persistent_cache_directory" in flags:
        return None
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), machine_key())
    quote = "'" if "'" not in folder else '"'
    try:
        if quote in folder:
            raise OSError(0, "both quote characters in its path")
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        warn(f"compiling without the XLA cache: cannot write to {folder} ({error.strerror or error})")
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={quote}{folder}{quote}".strip()
    _cache_folder = folder
    if now:
        tf.config.list_logical_devices()
        if previous is None:
            del os.environ["TF_XLA_FLAGS"]
        else:
            os.environ["TF_XLA_FLAGS"] = previous
    return folder


# Library users opt in with VQK_XLA_CACHE=DIR: read here, when the package imports its TensorFlow
# modules, before the first model is built (later would be too late for TensorFlow).
use_compile_cache(None)


def _clear_compile_cache(error):
    """Remove the cache's entries after a first call failed: TensorFlow fails a call whose entry
    it cannot load (cut short, say) rather than compile anew. False, leaving the cache alone,
    where no entry can be to blame: this process has no cache of its own, it was already cleared,
    it holds no entry, or the error is running out of memory (a large --n on a GPU)."""
    global _cache_folder
    folder = _cache_folder
    found = glob.glob(os.path.join(glob.escape(folder), "*.pb")) if folder else []
    if not found or isinstance(error, tf.errors.ResourceExhaustedError):
        return False
    _cache_folder = None
    for path in found:
        try:
            os.remove(path)
        except OSError:
            pass
    reason = str(error.message).splitlines()[0] if error.message else type(error).__name__
    warn(f"XLA cache entry in {folder} not loaded ({reason}): cache cleared, compiling anew")
    return True


class Sampler:
    """The compiled sampler of one prior: `function`, a tf.function of `compiled`, traced once per
    batch size on first use (seeds and sampling options are tensors: other values reuse it), and
    `sample`, which runs it.

    One per prior (`of`), kept for the prior's lifetime; it holds the prior weakly, so that a
    sampler never keeps its prior alive. It reads the prior's variables, so new weights need no
    new sampler.
    """

    cpu_batch_size = 16  # samples per batch on a CPU (see default_batch_size)

    def __init__(self, model):
        self._model = weakref.ref(model)
        # The JAX and PyTorch backends run `sample_eagerly` instead: no TensorFlow program.
        self.compiles = backend.name() == "tensorflow"
        self.function = tf.function(self.compiled, jit_compile=True, autograph=False) if self.compiles else None
        self._ran = False

    def call(self, *args):
        """self.function(*args). The first call compiles, or loads the program from the compile
        cache; an entry that cannot be loaded clears the cache and compiles with a new function
        (whose key no entry has)."""
        function = self.function
        try:
            result = function(*args)
        except tf.errors.OpError as error:
            if self._ran:
                raise
            with _cache_lock:  # sample_codes's threads fail together: one clears, all retry
                if self.function is function:
                    if not _clear_compile_cache(error):
                        raise
                    self.function = tf.function(self.compiled, jit_compile=True, autograph=False)
            result = self.function(*args)
        self._ran = True
        return result

    @classmethod
    def of(cls, model):
        """model's sampler of this class, made on first use."""
        if model not in _samplers:
            _samplers[model] = cls(model)
        return _samplers[model]

    @property
    def model(self):
        model = self._model()
        if model is None:  # the sampler holds its prior weakly: keep a reference to the prior
            raise ReferenceError("this sampler's prior no longer exists: keep the prior, call prior.sampler() when needed")
        return model

    def tracing_count(self):
        return self.function.experimental_get_tracing_count()

    def compiled(self, *args):
        """The XLA-compiled part of `sample`."""
        raise NotImplementedError

    def sample(self, batch, seed, temperature, top_k, top_p, classes=None):
        """(batch, height * width) int32 codes. batch: a Python int (one trace per batch size);
        seed: a pair of ints, the draw's seed and the index of this batch's first sample among all
        the draw's samples (`noise`: a sample's noise does not depend on its batch);
        top_k: an int (num_codes: no restriction); top_p: a float (1.0: none); classes: (batch,)
        class ids, or None."""
        raise NotImplementedError


NOISE_KEYS = (0x9E3779B9, 0x7F4A7C15)  # the hash's two starting states (any two constants)


def xor(a, b):
    return tf.bitwise.bitwise_xor(a, b)


def mix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on
    every input bit."""
    h = xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = xor(h, tf.bitwise.right_shift(h, tf.constant(13, tf.uint32)))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def unit_interval(h):
    """uint32 -> float32 in (0, 1): its top 23 bits u as (u + 0.5) / 2**23, exact in float32 (24
    bits would round 2**24 - 0.5 up to 1.0, an infinite Gumbel score)."""
    top = tf.cast(tf.bitwise.right_shift(h, tf.constant(9, tf.uint32)), tf.float32)
    return (top + 0.5) * (1.0 / 2**23)


def noise(seed, position, rows, num_codes):
    """(rows, num_codes) float32 uniforms in (0, 1), for row r and code k a hash of (seed, sample
    seed[1] + r, position, k): one lane a = mix32 of (seed's low 32 bits, sample, position) in
    turn (a = mix32(a ^ word), from NOISE_KEYS[0]), the other b = mix32(NOISE_KEYS[1] ^ seed's high
    32 bits), then unit_interval(mix32(mix32(a ^ k) + b)). Two seeds differing in either half give
    different noise for every code.

    A counter-based generator: a sample's noise is a function of its index among all the draw's
    samples, not of the batch it runs in, so the same seed draws the same noise whatever the batch
    size, on a CPU or a GPU (tf.random's stateless streams fill a batch's rows from one key, so the
    codes depended on how the samples were batched)."""
    seed = tf.cast(seed, tf.int64)
    low = tf.cast(tf.bitwise.bitwise_and(seed[0], tf.constant(0xFFFFFFFF, tf.int64)), tf.uint32)
    high = tf.cast(tf.bitwise.right_shift(seed[0], tf.constant(32, tf.int64)), tf.uint32)  # seed >= 0
    samples = tf.cast(seed[1] + tf.cast(tf.range(rows), tf.int64), tf.uint32)  # XLA has no uint32 range
    a = mix32(xor(tf.constant(NOISE_KEYS[0], tf.uint32), low))
    a = mix32(xor(a, samples))[:, None]
    a = mix32(xor(a, tf.cast(position, tf.uint32)))
    b = mix32(xor(tf.constant(NOISE_KEYS[1], tf.uint32), high))
    return unit_interval(mix32(mix32(xor(a, tf.cast(tf.range(num_codes), tf.uint32)[None, :])) + b))


def noise_numpy(seed, position, rows, num_codes):
    """`noise` in NumPy, for the samplers of the JAX and PyTorch backends, which run outside
    TensorFlow (PyTorch has no uint32 shifts): the same seed draws the same codes on every backend."""
    def mix(h):  # mix32 on uint32 arrays, whose products wrap modulo 2**32 as TensorFlow's do
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    word = lambda value: np.array([value % 2**32], np.uint32)  # noqa: E731
    a = mix(word(NOISE_KEYS[0]) ^ word(int(seed[0])))
    samples = ((int(seed[1]) + np.arange(rows, dtype=np.int64)) % 2**32).astype(np.uint32)
    a = mix(a ^ samples)[:, None]
    a = mix(a ^ word(position))
    b = mix(word(NOISE_KEYS[1]) ^ word(int(seed[0]) >> 32))
    h = mix(mix(a ^ np.arange(num_codes, dtype=np.uint32)[None, :]) + b)
    return ((h >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 2**23)


def draw_numpy(logits, temperature, top_k, top_p, seed, position=0):
    """`draw` in NumPy on (batch, K) logits, with `noise_numpy`: the JAX and PyTorch samplers' draw."""
    logits = np.asarray(logits, np.float32) / np.float32(temperature)
    num_codes = logits.shape[-1]
    if top_k < num_codes or top_p < 1.0:
        ranked = -np.sort(-logits, axis=-1)
        in_top_k = np.arange(num_codes) < top_k
        masked = np.where(in_top_k, ranked, -np.inf)
        probs = np.exp(masked - masked[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.concatenate([np.zeros_like(probs[:, :1]), np.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
        kept = np.sum(in_top_k & (before < top_p), axis=-1)
        threshold = np.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
        logits = np.where(logits < threshold, np.float32(-np.inf), logits)
    uniform = noise_numpy(seed, position, len(logits), num_codes)
    return np.argmax(logits - np.log(-np.log(uniform)), axis=-1).astype(np.int32)


def draw(logits, temperature, top_k, top_p, seed, position=0):
    """One code per row of logits (batch, K) from softmax(logits / temperature), restricted to the
    top_k likeliest codes, then to the nucleus: the fewest likeliest codes whose probability (after
    top-k) reaches top_p. Codes tied with the last one kept are kept too. seed: (the draw's seed,
    the first row's sample index); position: the code's position in the map (`noise`).

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
    uniform = noise(seed, position, tf.shape(logits)[0], num_codes)
    return tf.cast(tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1), tf.int32)


def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x):
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def check_sampling_options(prior, n, grid_shape, temperature, top_k, top_p, seed=None, batch_size=None):
    """UsageError (a ValueError) naming the first bad argument of `sample_codes`."""
    if not callable(getattr(prior, "sampler", None)):
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
    if backend.name() != "tensorflow":  # eager: a batch shares each position's per-call overhead
        return n
    return n if tf.config.list_logical_devices("GPU") else min(sampler.cpu_batch_size, n)


def sample_codes(prior, n, grid_shape, temperature=1.0, top_k=None, seed=None, top_p=None, batch_size=None,
                 progress=False, classes=None, top_codes=None):
    """n code maps (n, h, w) int32 drawn from the prior, position by position.

    temperature=1, top_k=None and top_p=None is the reference's plain sampling; other values are
    departures. The same seed draws the same noise whatever batch_size, on a CPU or a GPU (`noise`),
    so the same codes where the prior's probabilities are the same (float rounding can tip a
    near-tie); seed=None draws a fresh one.
    classes (class-conditional priors): a class name or id for all samples, or one per sample;
    None: every class in turn, in equal consecutive blocks.
    Samples run in batches of batch_size, in parallel on the CPU cores; the last is padded so that
    all share one compiled loop. Default (`default_batch_size`): all n at once on a GPU; on a CPU
    the prior's sampler's `cpu_batch_size`.
    top_codes (the bottom prior of a two-level run, which needs them): (n, top h, top w), the top
    code map each sample is drawn under (`sample_levels` draws both levels).
    """
    check_sampling_options(prior, n, grid_shape, temperature, top_k, top_p, seed, batch_size)
    h, w = grid_shape
    ids = sample_classes(prior, n, classes)
    top = check_top_codes(prior, n, top_codes)
    sampler = prior.sampler()
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
    batch = default_batch_size(sampler, n) if batch_size is None else min(batch_size, n)
    bar = tqdm(total=n * h * w, desc="sampling", unit="code", disable=not progress)

    def one_batch(index):
        rows = None if ids is None else np.resize(ids[index * batch:(index + 1) * batch], batch)  # last: padded
        condition = {} if top is None else {"top_codes": np.resize(top[index * batch:(index + 1) * batch],
                                                                    (batch, *top.shape[1:]))}
        codes = sampler.sample(batch, (seed, index * batch), float(temperature), top_k or prior.num_codes,
                               1.0 if top_p is None else float(top_p), classes=rows, **condition)
        bar.update(min(batch, n - index * batch) * h * w)  # the last batch's padding is not progress
        return codes

    with one_trace_per_object(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        codes = np.concatenate(list(pool.map(one_batch, range(-(-n // batch)))))[:n]
    bar.close()
    return codes.reshape(n, h, w)


def check_top_codes(prior, n, top_codes):
    """top_codes as (n, top h * top w) int32 for a conditioned prior (None for another), else UsageError."""
    condition = getattr(prior, "condition", None)
    if condition is None:
        if top_codes is not None:
            raise UsageError("top_codes: this prior is not conditioned on a top level (only a two-level run's "
                             "bottom prior is)", "top_codes")
        return None
    height, width, num_codes = condition
    if top_codes is None:
        raise UsageError("top_codes: the bottom prior of a two-level run draws under a top code map: give "
                         f"(n, {height}, {width}) top codes (sample_levels draws both)", "top_codes")
    top = np.asarray(top_codes)
    if top.shape != (n, height, width) or not np.issubdtype(top.dtype, np.integer) or top.min() < 0 \
            or top.max() >= num_codes:
        raise UsageError(f"top_codes must be ({n}, {height}, {width}) integer codes in [0, {num_codes}), "
                         f"got shape {top.shape}", "top_codes")
    return top.reshape(n, -1).astype(np.int32)


def level_seed(seed):
    """The bottom level's seed of a two-level draw: another stream than the top level's."""
    return (int(seed) * 0x9E3779B97F4A7C15 + 1) % 2**63


def sample_levels(top_prior, bottom_prior, n, temperature=1.0, top_k=None, seed=None, top_p=None, batch_size=None,
                  progress=False, classes=None):
    """A two-level run's n samples, [bottom codes (n, h, w), top codes (n, h/2, w/2)]: the top
    code maps from the top prior (classes: its, if class-conditional), then each bottom map from
    the bottom prior under its top map. temperature, top_k and top_p: one value for both levels,
    or a pair (top, bottom). The bottom level draws with its own seed (`level_seed`)."""
    pick = lambda value, level: value[level] if isinstance(value, (tuple, list)) else value  # noqa: E731
    seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
    top = sample_codes(top_prior, n, (top_prior.height, top_prior.width), pick(temperature, 0), pick(top_k, 0), seed,
                       pick(top_p, 0), batch_size, progress, classes)
    bottom = sample_codes(bottom_prior, n, (bottom_prior.height, bottom_prior.width), pick(temperature, 1),
                          pick(top_k, 1), level_seed(seed), pick(top_p, 1), batch_size,
                          progress, top_codes=top)
    return [bottom, top]
