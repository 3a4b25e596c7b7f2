"""The quantizer layers: the reference's vector quantizer and its options (EMA codebook, dead-code
restarts, cosine codebook, rotation trick), the Gumbel-softmax and finite scalar (FSQ) quantizers,
the one factory that maps a Config to one of them (`build_quantizer`), and the code-usage metrics.
All written with keras.ops and registered serializable.

Every quantizer follows one protocol (CodebookLayer), which is all the VQ-VAE reads of it:
  layer(z) -> [codes, code vectors]; layer(z, return_decoder_input=True) adds what the decoder
    sees, with the quantizer's own gradient estimator inside (straight-through copy, rotation
    trick, soft mixture, rounding);
  codebook_terms, codebook_weight: whether the reference's mse_e and beta * mse_z apply, and
    mse_e's weight (the objective, models.VQVAEObjective, adds them);
  metric_names: the loss terms the layer adds itself (add_loss) and reports under these names;
  training_callbacks(config, start_step) and callback_log_names: what it needs from the training
    loop (the Gumbel temperature schedule) and the log columns those callbacks add.
  unquantized(z): what the decoder gets from z without the choice of a code (recon --no-quantize,
    the test_ae_1 grids, psnr_unquantized).

Distances, argmin, the codebook and its EMA statistics are computed in float32 whatever the model's
dtype policy: |z|^2 + |e|^2 - 2 z.e in float16 picks wrong codes.

Under a tf.distribute strategy every replica sees its part of the global batch, but the codebook
updates (EMA, dead-code restarts) and the perplexity are over the global batch: the statistics are
summed over replicas with tf.distribute's all-reduce, so every replica computes the same update.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from .backend import sync_variables
from .distribute import ReplicaLocalLosses, replica_rows, replica_sum, thread_state

PACKAGE = "vq_vae_keras"
TOP = "_top"  # VQ-VAE-2's top level: its quantizer layer's name and its metrics end with this
LEVEL_SUFFIXES = ("", TOP)  # what each level's names end with, in the [bottom, top] order of latents and codes


def l2_normalize(x, epsilon=1e-12):
    """x / |x| along the last axis (0 stays 0)."""
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), epsilon))


@keras.saving.register_keras_serializable(package=PACKAGE)
class CodeUsage(keras.metrics.Metric):
    """How many times each code was chosen since the last reset; result() is the fraction used."""

    def __init__(self, num_codes, name="usage", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_codes = num_codes
        self.counts = self.add_variable(shape=(num_codes,), initializer="zeros", name="counts")

    def update_state(self, codes):
        # The global batch's counts: Keras averages each replica's result(), and the mean of the
        # replicas' used fractions is not the fraction any replica's codes used.
        self.counts.assign_add(replica_sum(code_counts(codes, self.num_codes, self.dtype)))

    def result(self):
        return ops.mean(ops.cast(self.counts > 0, self.dtype))

    def get_config(self):
        return {**super().get_config(), "num_codes": self.num_codes}


def code_counts(codes, num_codes, dtype="float32"):
    """(num_codes,) how often each code occurs in codes. A segment sum, not a sum of one-hots: an
    FSQ codebook of 2^16 codes would make the one-hot of a 32x32 batch gigabytes."""
    flat = ops.reshape(ops.cast(codes, "int32"), (-1,))
    return ops.segment_sum(ops.ones_like(flat, dtype=dtype), flat, num_segments=num_codes)


def perplexity(codes, num_codes):
    """exp(entropy) of the code histogram (of the global batch under a strategy): num_codes when
    all are used equally, 1 when one is."""
    counts = replica_sum(code_counts(codes, num_codes))
    p = counts / ops.sum(counts)
    return ops.exp(-ops.sum(p * ops.log(ops.maximum(p, 1e-10))))


class StepMetrics:
    """Mixin for a layer whose call computes metrics of the training step (the perplexity, code
    usage, the loss terms): `record(metric, values)` in call.

    TensorFlow and PyTorch: the metric is updated there and then, as any Keras layer would.
    JAX: Keras's trainer runs call() with only the model's weights in scope, where a metric cannot
    be updated (keras-team/keras#21639); its compute_loss has the metrics in scope. So the values
    are kept, and the training model's compute_loss updates the metrics from them
    (`update_metrics`, models.TrainModel): the same step, the same trace. Kept per thread."""

    def record(self, metric, *values):
        if keras.backend.backend() != "jax":
            metric.update_state(*values)
            return
        recorded = vars(thread_state(self)).setdefault("metrics", {})
        recorded[metric.name] = (metric, values)  # one entry a metric: a later call replaces it

    def update_metrics(self, update=True):
        """Update the metrics from what call() recorded since (update=False: drop it)."""
        for metric, values in vars(thread_state(self)).pop("metrics", {}).values():
            if update:
                metric.update_state(*values)


class CodebookLayer(StepMetrics, keras.layers.Layer):
    """What the quantizers share: a (num_codes, dim) codebook, code lookup, the output
    [codes (...) int32, code vectors (..., dim)], the perplexity and usage metrics, and the
    protocol the VQ-VAE is built from (the module's docstring)."""

    codebook_terms = True  # the reference's mse_e and beta * mse_z apply to its code vectors
    metric_names = ()  # the loss terms it adds itself and reports, in log order
    callback_log_names = ()  # the log columns its training_callbacks add, in log order

    def __init__(self, num_codes, seed=None, metric_suffix="", **kwargs):
        kwargs.setdefault("dtype", "float32")  # under any mixed precision policy: see the module doc
        super().__init__(**kwargs)
        self.num_codes, self.seed, self.metric_suffix = num_codes, seed, metric_suffix
        self.perplexity = keras.metrics.Mean(name="perplexity" + metric_suffix)
        self.usage = CodeUsage(num_codes, name="usage" + metric_suffix)

    def add_codebook(self, dim, trainable=True):
        # Keras 2's 'uniform' initialiser, as in the reference.
        self.codebook = self.add_weight(name="codebook", shape=(self.num_codes, dim), trainable=trainable,
                                        initializer=keras.initializers.RandomUniform(-0.05, 0.05))

    @property
    def codebook_weight(self):
        """Weight of mse_e, the term that moves the codebook by gradient."""
        return 1.0

    def training_callbacks(self, config, start_step):
        """Keras callbacks the training loop runs for this quantizer, from global step start_step."""
        return []

    def outputs(self, codes, vectors, decoder_input, return_decoder_input):
        return [codes, vectors, decoder_input] if return_decoder_input else [codes, vectors]

    def track_usage(self, codes):
        self.record(self.perplexity, perplexity(codes, self.num_codes))
        self.record(self.usage, codes)

    def code_vectors(self):
        """The (num_codes, dim) vectors codes stand for."""
        return self.codebook

    def unquantized(self, z):
        """What the decoder gets from z (..., dim) without the choice of a code: z itself here, the
        reference's test_ae_1 (z lives beside the code vectors); FSQ and Gumbel have their own."""
        return z

    def lookup(self, codes):
        """Code vectors of integer codes: (...) -> (..., dim)."""
        return ops.take(self.code_vectors(), ops.cast(codes, "int32"), axis=0)

    def compute_output_spec(self, z, training=None, return_decoder_input=False):
        # One KerasTensor per output, even where the call returns one tensor twice: the graph
        # tells outputs apart by these objects, and e must not stand for the decoder's input.
        vectors = lambda: keras.KerasTensor(z.shape, dtype=self.compute_dtype)  # noqa: E731
        return self.outputs(keras.KerasTensor(z.shape[:-1], dtype="int32"), vectors(), vectors(), return_decoder_input)

    def get_config(self):
        config = {**super().get_config(), "num_codes": self.num_codes, "seed": self.seed}
        if self.metric_suffix:  # one-level files stay as they were
            config["metric_suffix"] = self.metric_suffix
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(CodebookLayer):
    """Nearest-neighbour lookup in a learned codebook (the reference's `VectorQuantizer`).

    Input:  z, (..., dim).
    Output: [codes (...) int32, code vectors (..., dim)], the codebook rows nearest to z in
            squared Euclidean distance |z|^2 + |e|^2 - 2 z.e; with return_decoder_input=True
            also what the decoder sees: e's values with a gradient path to z, the reference's
            straight-through copy z + stop_gradient(e - z) (or the rotation trick). The
            argmin has no gradient, so the objective's mse_e and beta * mse_z train the
            codebook and the encoder's commitment (models.VQVAEObjective).
    While training it also tracks the batch perplexity and which codes were used.

    Options (off by default, departures from the reference), applied only while training:
      ema_decay: the codebook is not trained by gradient but moved by exponential moving averages
        of the encoder outputs assigned to each code (the VQ-VAE paper's appendix):
        N_k <- d N_k + (1 - d) n_k,  m_k <- d m_k + (1 - d) sum(z assigned to k),
        e_k = m_k / N~_k with Laplace-smoothed counts N~_k = (N_k + eps) / (N + K eps) N.
        The state starts as if each code had been assigned once to its initial vector.
      restart_dead: a code unused for this many training steps is moved to a random encoder
        output of the current batch.
    And (at inference too):
      cosine: z and the code vectors are l2-normalised before the distance and the lookup
        (ViT-VQGAN's codebook): the nearest code is the one of largest cosine similarity and the
        code vectors are unit rows. EMA and restarts then work on the normalised z.
      rotation_trick: the decoder's input reaches z by the rotation trick (RotationTrick), not
        the straight-through copy.
    """

    def __init__(self, num_codes, ema_decay=None, ema_epsilon=1e-5, restart_dead=0, seed=None, cosine=False,
                 rotation_trick=False, **kwargs):
        # z arrives in the encoder's dtype: the straight-through copy is taken in it, as the decoder
        # would take it (under mixed precision, z + stop_gradient(e - z) in bfloat16 / float16);
        # the distances cast z to float32 themselves.
        kwargs.setdefault("autocast", False)
        super().__init__(num_codes, seed, **kwargs)
        self.ema_decay, self.ema_epsilon, self.restart_dead = ema_decay, ema_epsilon, restart_dead
        self.cosine, self.rotation_trick = cosine, rotation_trick
        if restart_dead:
            self.seed_generator = keras.random.SeedGenerator(seed, name="restart_seed" + self.metric_suffix)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.add_codebook(dim, trainable=self.ema_decay is None)
        if self.ema_decay is not None:
            self.ema_counts = self.add_weight(name="ema_counts", shape=(self.num_codes,), initializer="ones",
                                              trainable=False)
            self.ema_sums = self.add_weight(name="ema_sums", shape=(self.num_codes, dim), initializer="zeros",
                                            trainable=False)
            self.ema_sums.assign(ops.copy(self.codebook))  # a copy: JAX cannot donate one buffer as two variables
        if self.restart_dead:
            self.idle_steps = self.add_weight(name="idle_steps", shape=(self.num_codes,), initializer="zeros",
                                              trainable=False)

    @classmethod
    def for_config(cls, config, suffix="", ema=False):
        return cls(config.num_codes, ema_decay=config.ema_decay if ema else None, ema_epsilon=config.ema_epsilon,
                   restart_dead=config.restart_dead, seed=config.seed, cosine=config.cosine_codebook,
                   rotation_trick=config.rotation_trick, metric_suffix=suffix, name="vector_quantizer" + suffix)

    @property
    def codebook_weight(self):
        # The EMA codebook follows the encoder by averages: mse_e (its gradient) is dropped.
        return 1.0 if self.ema_decay is None else 0.0

    def code_vectors(self):
        return l2_normalize(self.codebook) if self.cosine else self.codebook

    def lookup(self, codes):
        if not self.cosine:
            return super().lookup(codes)
        # Rows taken, then normalised (normalised rows, taken): the gradient reaches the codebook as
        # the gather's, row by row, as the default's does. Normalised first, the codebook would be a
        # dense matrix to Adam, and Keras 3's Adam moves such a row by at most lr a step, where it
        # moves a gathered row used n times in a batch by up to sqrt(n) lr (each use counts in
        # Adam's second moment on its own): a cosine codebook some 20 times slower than the
        # default's, 0.5 dB lower at 1500 steps on photographs (same seed; bench/README.md).
        return l2_normalize(ops.take(self.codebook, ops.cast(codes, "int32"), axis=0))

    def distances(self, z):
        """Squared distance of every z to every code vector: (..., num_codes)."""
        codebook = self.code_vectors()
        z_sq = ops.sum(ops.square(z), axis=-1, keepdims=True)
        e_sq = ops.sum(ops.square(codebook), axis=-1)
        return z_sq + e_sq - 2 * ops.matmul(z, ops.transpose(codebook))

    def call(self, z, training=None, return_decoder_input=False):
        # The gradient estimator takes z as the encoder gave it (the cosine codebook's encoder
        # already ends on the unit sphere; the normalisation below is for the distances).
        encoded = z
        z = ops.cast(z, self.compute_dtype)
        if self.cosine:
            z = l2_normalize(z)
        codes = ops.cast(ops.argmin(self.distances(z), axis=-1), "int32")
        vectors = self.lookup(codes)  # before any update below: this step's code vectors
        decoder_input = None
        if return_decoder_input and self.rotation_trick:  # in float32, like the rest of the quantizer
            decoder_input = rotate_onto(ops.cast(encoded, self.compute_dtype), vectors)
        elif return_decoder_input:
            decoder_input = straight_through(encoded, vectors)
        if training:
            self.track_usage(codes)
            flat_z = ops.stop_gradient(ops.reshape(z, (-1, ops.shape(z)[-1])))
            assigned = ops.one_hot(ops.reshape(codes, (-1,)), self.num_codes, dtype=flat_z.dtype)  # (n, K)
            if self.ema_decay is not None:
                self.ema_update(assigned, flat_z)
            if self.restart_dead:
                self.restart_idle_codes(assigned, flat_z)
        return self.outputs(codes, vectors, decoder_input, return_decoder_input)

    def ema_update(self, assigned, flat_z):
        """assigned (n, K) one-hot, flat_z (n, dim): one EMA step of counts, sums and codebook."""
        d = self.ema_decay
        # Over the global batch: every replica then assigns the same values.
        counts = d * self.ema_counts + (1 - d) * replica_sum(ops.sum(assigned, axis=0))
        sums = d * self.ema_sums + (1 - d) * replica_sum(ops.matmul(ops.transpose(assigned), flat_z))
        total = ops.sum(counts)
        smoothed = (counts + self.ema_epsilon) / (total + self.num_codes * self.ema_epsilon) * total
        self.ema_counts.assign(counts)
        self.ema_sums.assign(sums)
        self.codebook.assign(sums / ops.expand_dims(smoothed, 1))

    def restart_idle_codes(self, assigned, flat_z):
        """Codes idle for restart_dead steps move to random encoder outputs of this (global) batch.
        Every replica draws the same picks (its seed state is the same); each contributes the
        picked rows it holds and the all-reduce hands every replica all of them."""
        used = replica_sum(ops.sum(assigned, axis=0)) > 0
        idle = ops.where(used, 0.0, self.idle_steps + 1.0)
        dead = idle >= self.restart_dead
        n = ops.shape(flat_z)[0]
        first, total = replica_rows(n)
        picks = keras.random.randint((self.num_codes,), 0, total, seed=self.seed_generator) - first
        mine = ops.expand_dims((picks >= 0) & (picks < n), 1)
        picked = replica_sum(ops.where(mine, ops.take(flat_z, ops.clip(picks, 0, n - 1), axis=0), 0.0))
        dead_column = ops.expand_dims(dead, 1)
        # .value: JAX's where takes arrays, not Keras variables
        self.codebook.assign(ops.where(dead_column, picked, self.codebook.value))
        if self.ema_decay is not None:  # the moved code starts its averages afresh at its new place
            self.ema_counts.assign(ops.where(dead, 1.0, self.ema_counts.value))
            self.ema_sums.assign(ops.where(dead_column, self.codebook.value, self.ema_sums.value))
        self.idle_steps.assign(ops.where(dead, 0.0, idle))

    def initialise(self, codebook):
        """Set the codebook (e.g. from k-means), and the EMA state to match it."""
        self.codebook.assign(codebook)
        if self.ema_decay is not None:
            self.ema_counts.assign(ops.ones((self.num_codes,)))
            self.ema_sums.assign(ops.copy(codebook))

    def compute_output_spec(self, z, training=None, return_decoder_input=False):
        outputs = super().compute_output_spec(z, training, return_decoder_input)
        if return_decoder_input and not self.rotation_trick:  # the straight-through copy keeps z's dtype
            outputs[2] = keras.KerasTensor(z.shape, dtype=z.dtype)
        return outputs

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay, "ema_epsilon": self.ema_epsilon,
                "restart_dead": self.restart_dead, "cosine": self.cosine, "rotation_trick": self.rotation_trick}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GumbelQuantizer(ReplicaLocalLosses, CodebookLayer):
    """Gumbel-softmax relaxation over a codebook (the dVAE of DALL-E), a departure from the reference.

    Input:  z, (..., dim).
    Output: [codes (...) int32, code vectors (..., dim)] (return_decoder_input=True: the code
            vectors once more, as the decoder's input: they need no estimator).
    A 1x1 projection turns z into logits over the codes. While training, the code vectors are the
    soft mixture softmax((logits + Gumbel noise) / temperature) @ codebook, so gradients reach the
    encoder, the projection and the codebook, and kl_weight * KL(softmax(logits) || uniform) is
    added to the losses by the layer itself (the one term that needs the logits) and reported as
    "kl"; the reference's mse_e and mse_z do not apply. At inference the code is the argmax of the
    logits and its vector the codebook row: codes work with the prior and sampling as the VQ
    codes do.
    `temperature` is a non-trainable weight, annealed during training by the callback that
    training_callbacks hands the training loop (GumbelAnneal), and logged as "temperature".
    """

    codebook_terms = False
    metric_names = ("kl",)
    callback_log_names = ("temperature",)

    def __init__(self, num_codes, kl_weight=5e-4, temperature=1.0, seed=None, **kwargs):
        super().__init__(num_codes, seed, **kwargs)
        self.kl_weight, self.initial_temperature = kl_weight, temperature
        self.seed_generator = keras.random.SeedGenerator(seed, name="gumbel_seed" + self.metric_suffix)
        self.kl = keras.metrics.Mean(name="kl" + self.metric_suffix)

    @classmethod
    def for_config(cls, config, suffix=""):
        return cls(config.num_codes, config.gumbel_kl_weight, config.gumbel_temperature, seed=config.seed,
                   metric_suffix=suffix, name="gumbel_quantizer" + suffix)

    def training_callbacks(self, config, start_step):
        return [GumbelAnneal(self, config, start_step)]

    def build(self, input_shape):
        dim = input_shape[-1]
        self.add_codebook(dim)
        self.logit_kernel = self.add_weight(name="logit_kernel", shape=(dim, self.num_codes),
                                            initializer="glorot_uniform")
        self.logit_bias = self.add_weight(name="logit_bias", shape=(self.num_codes,), initializer="zeros")
        self.temperature = self.add_weight(name="temperature", shape=(), trainable=False,
                                           initializer=keras.initializers.Constant(self.initial_temperature))

    def logits(self, z):
        return ops.matmul(z, self.logit_kernel) + self.logit_bias

    def unquantized(self, z):
        """The relaxation without its noise, at the current (annealed) temperature:
        softmax(logits / temperature) @ codebook (z is the projection's input, not a code vector)."""
        return ops.matmul(ops.softmax(self.logits(z) / self.temperature, axis=-1), self.codebook)

    def call(self, z, training=None, return_decoder_input=False):
        logits = self.logits(z)
        codes = ops.cast(ops.argmax(logits, axis=-1), "int32")
        if not training:
            vectors = self.lookup(codes)
            return self.outputs(codes, vectors, vectors, return_decoder_input)
        # The noise of the global batch, this replica's rows of it: each replica its own noise, and
        # N replicas draw what one device draws (every replica's generator is in the same state).
        shape = ops.shape(logits)
        first, total = replica_rows(shape[0])
        uniform = keras.random.uniform((total, *shape[1:]), minval=1e-10, maxval=1.0, seed=self.seed_generator)
        uniform = uniform[first:first + shape[0]]
        gumbel = -ops.log(-ops.log(uniform))
        soft = ops.softmax((logits + gumbel) / self.temperature, axis=-1)
        log_q = ops.log_softmax(logits, axis=-1)
        kl = ops.mean(ops.sum(ops.exp(log_q) * log_q, axis=-1)) + ops.log(float(self.num_codes))
        self.add_loss(self.kl_weight * kl)
        self.record(self.kl, kl)
        self.track_usage(codes)
        vectors = ops.matmul(soft, self.codebook)
        return self.outputs(codes, vectors, vectors, return_decoder_input)

    def get_config(self):
        return {**super().get_config(), "kl_weight": self.kl_weight, "temperature": self.initial_temperature}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FiniteScalarQuantizer(CodebookLayer):
    """Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
    Simple"), a departure from the reference: no codebook to learn, so none to collapse.

    Input:  z, (..., dim).
    Output: [codes (...) int32, code vectors (..., dim)].
    A 1x1 projection takes z to d = len(levels) channels; channel i is bounded to levels[i] values
    by tanh (the paper's bound, with its half-level offset for even levels), rounded to integers
    with a straight-through gradient, scaled to [-1, 1] and projected back to dim. The code is the
    mixed-radix number of the rounded channels (channel 0 the least significant digit), in
    [0, prod(levels)): the prior and sampling use it as they use VQ codes, and `lookup` turns it
    back into the same code vector. The gradient reaches the encoder through the rounding, so the
    code vectors are the decoder's input as they are (return_decoder_input=True repeats them).
    No codebook to learn and values bounded: neither mse_e nor the commitment term applies.
    """

    BOUND_EPSILON = 1e-3  # the paper's: keeps tanh's range inside the outer levels
    codebook_terms = False

    def __init__(self, levels, **kwargs):
        self.levels = [int(level) for level in levels]
        super().__init__(int(np.prod(self.levels)), **kwargs)
        levels = np.asarray(self.levels, np.float64)
        self._half_width = (levels // 2).astype(np.float32)  # rounded values lie in [-half_width, ...]
        self._half_range = ((levels - 1) * (1 - self.BOUND_EPSILON) / 2).astype(np.float32)
        self._offset = np.where(levels % 2 == 0, 0.5, 0.0).astype(np.float32)
        self._shift = np.tan(self._offset / self._half_range).astype(np.float32)
        self._radix = np.cumprod([1] + self.levels[:-1]).astype(np.float32)  # exact below 2^24 codes

    @classmethod
    def for_config(cls, config, suffix=""):
        return cls(config.fsq_levels, metric_suffix=suffix, name="fsq_quantizer" + suffix)

    def build(self, input_shape):
        dim, d = input_shape[-1], len(self.levels)
        # The constants as the backend's tensors: PyTorch's tensors do not combine with NumPy arrays.
        for name in ("_half_width", "_half_range", "_offset", "_shift", "_radix"):
            setattr(self, name, ops.convert_to_tensor(getattr(self, name)))
        self.project_in_kernel = self.add_weight(name="project_in_kernel", shape=(dim, d), initializer="glorot_uniform")
        self.project_in_bias = self.add_weight(name="project_in_bias", shape=(d,), initializer="zeros")
        self.project_out_kernel = self.add_weight(name="project_out_kernel", shape=(d, dim),
                                                  initializer="glorot_uniform")
        self.project_out_bias = self.add_weight(name="project_out_bias", shape=(dim,), initializer="zeros")

    def bound(self, h):
        """(..., d) -> (..., d) in (-half_range - offset, half_range - offset): levels[i] integers round to."""
        return ops.tanh(h + self._shift) * self._half_range - self._offset

    def rounded_channels(self, z):
        """z (..., dim) -> (rounded channels, their straight-through version) (..., d): integers in
        [-half_width, levels - 1 - half_width]; the second has the gradient of the bounded values."""
        bounded = self.bound(ops.matmul(z, self.project_in_kernel) + self.project_in_bias)
        rounded = ops.round(bounded)
        return rounded, bounded + ops.stop_gradient(rounded - bounded)

    def project_out(self, rounded):
        return ops.matmul(rounded / self._half_width, self.project_out_kernel) + self.project_out_bias

    def unquantized(self, z):
        """The bounded channels before rounding, projected out (z is the projection's input, not a
        code vector)."""
        return self.project_out(self.bound(ops.matmul(z, self.project_in_kernel) + self.project_in_bias))

    def call(self, z, training=None, return_decoder_input=False):
        rounded, through = self.rounded_channels(z)  # (`quantize` is a Keras Layer method)
        codes = ops.cast(ops.sum((ops.stop_gradient(rounded) + self._half_width) * self._radix, axis=-1), "int32")
        if training:
            self.track_usage(codes)
        vectors = self.project_out(through)
        return self.outputs(codes, vectors, vectors, return_decoder_input)

    def lookup(self, codes):
        """Code vectors of integer codes: (...) -> (..., dim), the digits of each code projected out."""
        codes = ops.expand_dims(ops.cast(codes, "float32"), -1)
        digits = ops.mod(ops.floor(codes / self._radix), np.asarray(self.levels, np.float32))
        return self.project_out(digits - self._half_width)

    def get_config(self):
        config = {**super().get_config(), "levels": self.levels}
        del config["num_codes"], config["seed"]  # the product of the levels; nothing random to seed
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**{k: v for k, v in config.items() if k != "seed"})  # older files carry an unused seed


def straight_through(z, e):
    """The reference's straight-through estimator: e's value, z's gradient: z + stop_gradient(e - z)."""
    e = ops.cast(e, z.dtype)
    return z + ops.stop_gradient(e - z)


def rotate_onto(z, e):
    """The rotation trick (RotationTrick's docstring): e's value; gradient to z R^T g."""
    # Unit vectors for every z that is not 0 in float32 (the default epsilon would shorten u below |z| = 1e-6).
    tiny = float(np.finfo(np.float32).tiny)
    u, q = ops.stop_gradient(l2_normalize(z, tiny)), ops.stop_gradient(l2_normalize(e, tiny))
    r = ops.stop_gradient(l2_normalize(u + q))
    dot = lambda a, b: ops.sum(a * b, axis=-1, keepdims=True)  # noqa: E731
    rotated = z - 2 * dot(z, r) * r + 2 * dot(z, u) * q  # R z: e's direction, z's length, linear in z
    return ops.stop_gradient(e) + (rotated - ops.stop_gradient(rotated))  # e exactly (x - x is 0); R^T g to z alone


@keras.saving.register_keras_serializable(package=PACKAGE)
class RotationTrick(keras.layers.Layer):
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
    Trick"), a departure from the reference's straight-through copy. VectorQuantizer applies it
    itself (rotation_trick=True); the layer stays for models saved when it stood on its own.

    Inputs: [z, e], both (..., dim): encoder outputs and their code vectors.
    Output: e's values. Gradient to z: R^T g for the incoming gradient g, where
    R = I - 2 r r^T + 2 q u^T is the rotation taking u = z/|z| onto q = e/|e|
    (r = (u + q)/|u + q|), treated as a constant. So the gradient keeps the angle between z and the
    direction the decoder asks e to move in, instead of being copied unchanged, and keeps its length.
    Without the paper's gain lambda = |e| / |z| (its lambda R z is e itself; here R z + a constant
    is): that gain ties the encoder's gradient to the codebook's scale, 0.03 at the reference's
    +-0.05 codebook against |z| ~ 6, and cost 1.2 dB of held-out PSNR at 1500 steps on photographs
    (same seed; bench/README.md, "Codebook options on photographs"). With an EMA codebook, as in
    the paper, the codes follow the encoder and the gain stays near 1. Computed in float32 under any
    dtype policy.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        return rotate_onto(*inputs)

    def compute_output_shape(self, input_shapes):
        return input_shapes[1]


@keras.saving.register_keras_serializable(package=PACKAGE)
class StraightThrough(keras.layers.Layer):
    """Straight-through estimator (the reference's Lambda): the value of e, the gradient of z.
    VectorQuantizer applies it itself; the layer stays for models saved when it stood on its own.

    Inputs: [z, e], both (..., dim): encoder outputs and their code vectors.
    Output: z + stop_gradient(e - z), (..., dim).
    """

    def call(self, inputs):
        return straight_through(*inputs)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    @classmethod
    def from_config(cls, config):
        # Files saved before the loss moved into VQVAEObjective carry its weights here.
        config = {k: v for k, v in config.items() if k not in ("beta", "codebook_weight")}
        return cls(**config)


class GumbelAnneal(keras.callbacks.Callback):
    """Sets the Gumbel-softmax temperature from the global step before each step (the config's
    schedule, Config.gumbel_temperature_at), and logs it as "temperature" (the top level's layer:
    "temperature_top").
    start: the global step fit starts from (None: the optimizer's iteration count)."""

    def __init__(self, layer, config, start=None):
        super().__init__()
        self.layer, self.config, self.start = layer, config, start

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy()) if self.start is None else self.start

    def on_train_batch_begin(self, batch, logs=None):
        self.temperature = self.config.gumbel_temperature_at(self.step)
        sync_variables(self.model)
        self.layer.temperature.assign(self.temperature)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if logs is not None:
            logs["temperature" + self.layer.metric_suffix] = self.temperature


# config.quantizer -> (the layer class, what its for_config takes): the one place the name is read.
KINDS = {
    "vq": (VectorQuantizer, {}),
    "ema": (VectorQuantizer, {"ema": True}),
    "gumbel": (GumbelQuantizer, {}),
    "fsq": (FiniteScalarQuantizer, {}),
}


def quantizer_class(config):
    """The layer class of config.quantizer: its class attributes (codebook_terms, metric_names,
    callback_log_names) without building a layer."""
    return KINDS[config.quantizer][0]


def build_quantizer(config, top=False):
    """The quantizer layer a Config asks for: the reference's VectorQuantizer by default. top: the
    top level's of a two-level model (VQ-VAE-2): every option the bottom's, its own codebook size
    (config.top_codes) and seed, its name and metrics ending in TOP."""
    cls, options = KINDS[config.quantizer]
    if top:
        config = dataclasses.replace(config, num_codes=config.top_codes, seed=config.seed + 1)
    return cls.for_config(config, suffix=TOP if top else "", **options)
