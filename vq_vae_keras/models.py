"""The VQ-VAE: image -> encoder -> quantizer -> decoder -> image, as in the reference.

Reference names: e_model -> encoder, q_model -> quantizer, g_model -> decoder, train_model -> train_model.
"""

import contextlib
import random
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
from keras import layers, ops
from tqdm.auto import tqdm

from .config import OPTIMIZER_FIELDS, Config
from . import backend
from .distribute import ReplicaLocalLosses, whole_device_batch
from .errors import UsageError, one_trace_per_object
from .quantizers import LEVEL_SUFFIXES, PACKAGE, CodebookLayer, StepMetrics, build_quantizer, quantizer_class


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization, its moving statistics averaged over replicas.

    One device: the same layer. Under a tf.distribute strategy Keras 3 keeps one moving mean and
    variance per replica, each following its own slice of the batch (predictions would then depend
    on the replica an image lands on); here they are assigned with the "mean" aggregation, as
    tf.keras 2 did, so every replica holds the same values. `synchronized=True` (Keras's own
    option) normalises with the statistics of the global batch instead of the replica's slice.
    """

    def __init__(self, *args, synchronized=False, **kwargs):
        # Keras's option is tf.distribute's. Under JAX's DataParallel every layer already sees the
        # global batch; PyTorch runs on one device. So a run trained with it builds everywhere.
        super().__init__(*args, synchronized=synchronized and keras.backend.backend() == "tensorflow", **kwargs)

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") in ("moving_mean", "moving_variance"):
            kwargs["aggregation"] = "mean"
        return super().add_weight(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        # Keras normalises with moments and element-wise ops: about a dozen kernels forward and
        # backward per layer, the largest share of a CPU step without XLA (bench/README.md,
        # training speed). TensorFlow's fused kernel computes the same in one pass each way.
        fusable = (training and self.trainable and mask is None and not self.synchronized
                   and not getattr(self, "renorm", False)  # Keras 3.10+
                   and self.scale and self.center and len(inputs.shape) == 4 and self.axis in (-1, 3)
                   and keras.backend.backend() == "tensorflow")
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = ops.cast(inputs, "float32")  # statistics in float32 under any policy, as Keras's
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32"), epsilon=self.epsilon)
        # The fused kernel returns the batch variance with Bessel's correction; Keras's moving
        # variance follows the biased one, which is also what normalised y.
        n = ops.cast(ops.prod(ops.shape(x)[:-1]), "float32")
        variance = variance * (n - 1) / n
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        return ops.cast(y, self.compute_dtype)


def residual_block(x, name, synchronized=False):
    """x + Conv1x1(ReLU(BN(Conv3x3(ReLU(x))))), the reference's resnet_block."""
    dim = x.shape[-1]
    h = layers.Activation("relu", name=f"{name}_relu1")(x)
    h = layers.Conv2D(dim, 3, padding="same", name=f"{name}_conv3x3")(h)
    h = BatchNormalization(synchronized=synchronized, name=f"{name}_bn")(h)
    h = layers.Activation("relu", name=f"{name}_relu2")(h)
    h = layers.Conv2D(dim, 1, padding="same", name=f"{name}_conv1x1")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def build_encoder(config: Config, name="encoder") -> keras.Model:
    """(B, img_dim, img_dim, 3) images -> (B, img_dim/4, img_dim/4, z_dim) latents."""
    sync = config.sync_batchnorm
    x_in = keras.Input((config.img_dim, config.img_dim, 3), name="image")
    x = layers.Conv2D(config.z_dim, 4, strides=2, padding="same", name="conv1")(x_in)
    x = BatchNormalization(synchronized=sync, name="bn1")(x)
    x = layers.Activation("relu", name="relu1")(x)
    x = layers.Conv2D(config.z_dim, 4, strides=2, padding="same", name="conv2")(x)
    x = BatchNormalization(synchronized=sync, name="bn2")(x)
    for i in range(config.num_layers):
        x = residual_block(x, f"res{i}", sync)
        if i < config.num_layers - 1:  # the encoder's output has no BatchNorm
            x = BatchNormalization(synchronized=sync, name=f"res{i}_out_bn")(x)
    if config.cosine_codebook:  # z on the unit sphere everywhere it is used: quantizer, losses, k-means init
        x = layers.UnitNormalization(axis=-1, dtype="float32", name="unit_norm")(x)
    return keras.Model(x_in, x, name=name)


def build_decoder(config: Config) -> keras.Model:
    """(B, h, w, z_dim) latents -> (B, img_dim, img_dim, 3) images in [-1, 1].
    levels 2: [bottom (B, h, w, z_dim), top (B, h/2, w/2, z_dim)] -> images; the top latents are
    brought to the bottom's grid and both merged into z_dim channels, as in VQ-VAE-2."""
    h, w = config.grid_shape
    sync = config.sync_batchnorm
    z_in = x = keras.Input((h, w, config.z_dim), name="latent")
    if config.levels == 2:
        top_in = keras.Input((h // 2, w // 2, config.z_dim), name="top_latent")
        up = layers.Conv2DTranspose(config.z_dim, 4, strides=2, padding="same", name="top_upsample")(top_in)
        x = layers.Concatenate(name="levels")([z_in, up])
        x = layers.Conv2D(config.z_dim, 3, padding="same", name="levels_merge")(x)
        z_in = [z_in, top_in]
    for i in range(config.num_layers):
        x = BatchNormalization(synchronized=sync, name=f"res{i}_in_bn")(x)
        x = residual_block(x, f"res{i}", sync)
    x = layers.Conv2DTranspose(config.z_dim, 4, strides=2, padding="same", name="deconv1")(x)
    x = BatchNormalization(synchronized=sync, name="bn1")(x)
    x = layers.Activation("relu", name="relu1")(x)
    x = layers.Conv2DTranspose(3, 4, strides=2, padding="same", name="deconv2")(x)
    x = layers.Activation("tanh", dtype="float32", name="tanh")(x)  # images in float32 under mixed precision
    return keras.Model(z_in, x, name="decoder")


def build_top_encoder(config: Config) -> keras.Model:
    """VQ-VAE-2's top encoder: (B, h, w, z_dim) bottom features -> (B, h/2, w/2, z_dim) top latents;
    one more stride-2 stage and the reference's residual blocks, as the bottom encoder ends."""
    h, w = config.grid_shape
    sync = config.sync_batchnorm
    f_in = keras.Input((h, w, config.z_dim), name="features")
    x = layers.Conv2D(config.z_dim, 4, strides=2, padding="same", name="conv")(f_in)
    x = BatchNormalization(synchronized=sync, name="bn")(x)
    for i in range(config.num_layers):
        x = residual_block(x, f"res{i}", sync)
        if i < config.num_layers - 1:
            x = BatchNormalization(synchronized=sync, name=f"res{i}_out_bn")(x)
    if config.cosine_codebook:
        x = layers.UnitNormalization(axis=-1, dtype="float32", name="unit_norm")(x)
    return keras.Model(f_in, x, name="top_encoder")


def build_bottom_latents(config: Config) -> keras.Model:
    """VQ-VAE-2's conditioning of the bottom level on the top: [bottom features (B, h, w, z_dim),
    top code vectors (B, h/2, w/2, z_dim)] -> bottom latents (B, h, w, z_dim). The top vectors are
    decoded to the bottom grid (residual blocks, a stride-2 transposed convolution), concatenated
    with the features and merged by a 1x1 convolution: what the bottom quantizer sees."""
    h, w = config.grid_shape
    sync = config.sync_batchnorm
    f_in = keras.Input((h, w, config.z_dim), name="features")
    top_in = x = keras.Input((h // 2, w // 2, config.z_dim), name="top_vectors")
    for i in range(config.num_layers):
        x = BatchNormalization(synchronized=sync, name=f"res{i}_in_bn")(x)
        x = residual_block(x, f"res{i}", sync)
    x = layers.Conv2DTranspose(config.z_dim, 4, strides=2, padding="same", name="top_decoder")(x)
    x = layers.Concatenate(name="levels")([f_in, x])
    x = layers.Conv2D(config.z_dim, 1, name="merge")(x)
    if config.cosine_codebook:
        x = layers.UnitNormalization(axis=-1, dtype="float32", name="unit_norm")(x)
    return keras.Model([f_in, top_in], x, name="bottom_latents")


def predict_whole_batches(model, x, batch_size):
    """model.predict(x) on whole batches only: x is padded with zeros to a multiple of batch_size
    and the outputs cut back to len(x). Each model then compiles its predict step once, whatever
    len(x) is (grids of 32 and of 64 images, a short last batch), instead of once per batch shape:
    TensorFlow warns about such retracing, and it costs a compile each time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}", "batch_size")
    batch_size = whole_device_batch(batch_size)
    if isinstance(x, (list, tuple)):  # a two-level model's latents: one array per level, as many rows each
        n = len(x[0])
        padded = [pad_rows(np.asarray(part, np.float32), batch_size) for part in x]
    else:
        n = len(x)
        padded = pad_rows(np.asarray(x, np.float32), batch_size)
    with one_trace_per_object():
        out = model.predict(padded, batch_size=batch_size, verbose=0)
    return [o[:n] for o in out] if isinstance(out, (list, tuple)) else out[:n]


def pad_rows(x, batch_size):
    """x with rows of zeros added up to a multiple of batch_size (no rows: one batch of zeros)."""
    pad = batch_size if len(x) == 0 else -len(x) % batch_size
    return np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])


@dataclass
class VQVAE:
    """The four Keras models of the reference, sharing one set of layers, plus batched helpers.

    A two-level model (config.levels 2, VQ-VAE-2) has a second quantizer layer, top_vq_layer, and
    its latents, codes and code vectors are lists [bottom (N, h, w, ...), top (N, h/2, w/2, ...)]
    wherever one level's are one array: encode returns [z, z_top], decode takes [e, e_top], and
    codes_to_vectors, quantize and encode_folder likewise."""

    config: Config
    encoder: keras.Model
    quantizer: keras.Model
    decoder: keras.Model
    train_model: keras.Model
    vq_layer: CodebookLayer  # the quantizer layer (quantizers.build_quantizer): VectorQuantizer by default
    top_vq_layer: Optional[CodebookLayer] = None  # levels 2: the top level's

    @property
    def vq_layers(self) -> list:
        """The quantizer layers, bottom first: [vq_layer] or [vq_layer, top_vq_layer]."""
        return [self.vq_layer] if self.top_vq_layer is None else [self.vq_layer, self.top_vq_layer]

    def encode(self, images, batch_size=64):
        """Images (N, d, d, 3) in [-1, 1] -> latents z (N, h, w, z_dim) (levels 2: [z, z_top],
        z computed from the top level's code vectors, as in training)."""
        return predict_whole_batches(self.encoder, images, batch_size)

    def quantize(self, z, batch_size=64):
        """Latents -> (codes (N, h, w) int32, code vectors (N, h, w, z_dim)) (levels 2: each a
        list, bottom then top)."""
        out = predict_whole_batches(self.quantizer, z, batch_size)
        if self.top_vq_layer is None:
            return out[0].astype(np.int32), out[1]
        codes, vectors = out[:2], out[2:]
        return [c.astype(np.int32) for c in codes], vectors

    def unquantized(self, z):
        """Latents -> what the decoder gets from them without the choice of codes (levels 2: [bottom,
        top]): z itself for the VQ codebooks, FSQ's unrounded channels, Gumbel's noiseless mixture."""
        if self.top_vq_layer is None:
            return keras.ops.convert_to_numpy(self.vq_layer.unquantized(np.asarray(z, np.float32)))
        return [keras.ops.convert_to_numpy(layer.unquantized(np.asarray(level, np.float32)))
                for layer, level in zip(self.vq_layers, z)]

    def decode(self, z, batch_size=64):
        """Latents or code vectors (N, h, w, z_dim) (levels 2: [bottom, top]) -> images (N, d, d, 3) in [-1, 1]."""
        return predict_whole_batches(self.decoder, z, batch_size)

    def codes_to_vectors(self, codes):
        """Integer code maps (N, h, w) -> code vectors (N, h, w, z_dim) from the codebook (levels 2:
        [bottom, top] -> [bottom, top])."""
        if self.top_vq_layer is None:
            return keras.ops.convert_to_numpy(self.vq_layer.lookup(np.asarray(codes, np.int32)))
        return [keras.ops.convert_to_numpy(layer.lookup(np.asarray(c, np.int32))) for layer, c in zip(self.vq_layers, codes)]

    def encode_folder(self, folder, batch_size=64):
        """Code maps (N, h, w) int32 of every usable image of an ImageFolder (or ImageArray), in
        batches, with a progress bar: what the prior learns from (levels 2: [bottom, top])."""
        codes = []
        for i in tqdm(range(0, len(folder), batch_size), desc="encoding", unit="batch"):
            images = folder.read_batch(range(i, min(i + batch_size, len(folder))))
            if images is not None:
                codes.append(self.quantize(self.encode(images, batch_size), batch_size)[0])
        if not codes:
            raise UsageError(f"no readable images in {getattr(folder, 'folder', 'the images')}")
        if self.top_vq_layer is None:
            return np.concatenate(codes).astype(np.int32)
        return [np.concatenate(level).astype(np.int32) for level in zip(*codes)]

    def reconstruct(self, images, quantize=True, batch_size=64):
        """encoder -> (quantizer ->) decoder, as the reference's test_ae_2 (test_ae_1 without quantize)."""
        z = self.encode(images, batch_size)
        vectors = self.quantize(z, batch_size)[1] if quantize else self.unquantized(z)
        return self.decode(vectors, batch_size)


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAEObjective(StepMetrics, ReplicaLocalLosses, keras.layers.Layer):
    """The whole VQ-VAE objective, added with add_loss as the reference did, so that
    `train_model.compile(optimizer=...); train_model.fit(images)` trains every term.

    Inputs: [x, x_rec, z, e]: images and their reconstructions (B, d, d, 3), encoder outputs and
    their code vectors (B, h, w, dim); levels 2 (VQ-VAE-2): [x, x_rec, z, e, z_top, e_top], the
    top level's codebook and commitment terms added as the bottom's and reported as mse_e_top and
    mse_z_top. Output: x_rec unchanged.
    Loss: mse_x + codebook_weight * mse_e + beta * mse_z, where
      mse_x = mean((x - x_rec)^2)                  (the decoder and, through the quantizer's estimator, the encoder),
      mse_e = mean((stop_gradient(z) - e)^2)       (moves the codebook; weight 0 with the EMA codebook),
      mse_z = mean((stop_gradient(e) - z)^2)       (the commitment term, moves the encoder).
    codebook_terms=False (the Gumbel and FSQ quantizers): mse_x alone, and mse_e and mse_z are
    neither added nor reported. codebook_weight and codebook_terms are the quantizer layer's
    (`for_quantizer`); the terms a quantizer has beyond these (Gumbel's KL) it adds itself, and
    Keras sums every added loss into the model's.
    Computed in float32 under any dtype policy; the terms it adds are reported as metrics.
    """

    def __init__(self, beta=0.25, codebook_weight=1.0, codebook_terms=True, levels=1, **kwargs):
        if "gumbel" in kwargs:  # files saved before FSQ dropped its terms too
            codebook_terms = not kwargs.pop("gumbel")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.beta, self.codebook_weight, self.codebook_terms = beta, codebook_weight, codebook_terms
        self.levels = levels
        self.mse_x = keras.metrics.Mean(name="mse_x")
        if codebook_terms:  # attributes mse_e, mse_z (and mse_e_top, mse_z_top): one-level files stay as they were
            for name in level_names(["mse_e", "mse_z"], levels):
                setattr(self, name, keras.metrics.Mean(name=name))

    @classmethod
    def for_quantizer(cls, layer, beta, **kwargs):
        """The objective of a VQ-VAE with this quantizer layer: the reference's terms as they apply to it."""
        return cls(beta, layer.codebook_weight, layer.codebook_terms, **kwargs)

    def call(self, inputs):
        x, x_rec, *latents = (ops.cast(t, "float32") for t in inputs)
        mse_x = ops.mean(ops.square(x - x_rec))
        self.record(self.mse_x, mse_x)
        loss = mse_x
        for suffix, z, e in zip(LEVEL_SUFFIXES, latents[0::2], latents[1::2]):
            if not self.codebook_terms:
                break
            mse_e = ops.mean(ops.square(ops.stop_gradient(z) - e))
            mse_z = ops.mean(ops.square(ops.stop_gradient(e) - z))
            self.record(getattr(self, "mse_e" + suffix), mse_e)
            self.record(getattr(self, "mse_z" + suffix), mse_z)
            loss = loss + self.codebook_weight * mse_e + self.beta * mse_z
        self.add_loss(loss)
        return x_rec

    def compute_output_shape(self, input_shapes):
        return input_shapes[1]

    def get_config(self):
        config = {**super().get_config(), "beta": self.beta, "codebook_weight": self.codebook_weight,
                  "codebook_terms": self.codebook_terms}
        if self.levels != 1:
            config["levels"] = self.levels
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TrainModel(keras.Model):
    """The training graph (the reference's train_model): a functional model, image in,
    reconstruction out, whose layers add the whole objective (add_loss) and record the step's
    metrics (StepMetrics). Under JAX, compute_loss (where its trainer has the metrics in scope)
    updates them from what the layers recorded in this training step."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        for layer in self._flatten_layers(include_self=False):
            if isinstance(layer, StepMetrics):
                layer.update_metrics(update=training)  # not a training call's values in evaluate
        return loss


@contextlib.contextmanager
def dtype_policy(name):
    """Build layers under a dtype policy, then put the process-wide policy back as it was."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def seeded_initializers(seed):
    """Layers made inside draw their initial weights from `seed`: the same seed, the same weights.

    Keras gives each initializer made without a seed (glorot_uniform, uniform, ...) one of its own,
    drawn from Python's `random` as the layer makes it (Keras 3.9 to 3.15); that draw is seeded here and Python's
    random state put back afterwards, so nothing else in the process changes. The initializers
    and their distributions are Keras's defaults, as in the reference; each layer gets its own seed.
    Not thread-safe: another thread drawing from `random` during a build changes the weights."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def level_names(names, levels) -> list:
    """names, then with levels 2 the same names for the top level (LEVEL_SUFFIXES: ending in TOP)."""
    return [name + suffix for suffix in LEVEL_SUFFIXES[:levels] for name in names]


def metric_names(config: Config) -> list:
    """The keys of the logs that the config's train_model reports while training, in log order:
    the objective's terms as they apply to the quantizer, then the quantizer's own (each the
    bottom level's, then the top's)."""
    layer = quantizer_class(config)
    terms = ["mse_e", "mse_z"] if layer.codebook_terms else []
    return ["loss", "mse_x", *level_names(terms, config.levels), *level_names(layer.metric_names, config.levels),
            *level_names(["perplexity", "usage"], config.levels)]


def log_names(config: Config) -> list:
    """The columns of the training log: metric_names, with the quantizer's training callbacks'
    own (the Gumbel temperature) beside its terms, and "lr" where a schedule sets it."""
    names = metric_names(config)
    at = names.index("perplexity")
    lr = ["lr"] if config.lr_scheduled() else []  # callbacks.LearningRate's: a constant lr has no column
    return names[:at] + level_names(quantizer_class(config).callback_log_names, config.levels) + names[at:] + lr


def build_vqvae(config: Config) -> VQVAE:
    """The four models of the reference under config.precision (float32, mixed_bfloat16 or
    mixed_float16); the quantizer and the objective stay float32, weights are float32 in every
    policy, so weights saved in one precision load in any. The initial weights follow config.seed."""
    config.validate()
    if config.levels == 2:
        return build_two_level_vqvae(config)
    with dtype_policy(config.precision), seeded_initializers(config.seed):
        encoder = build_encoder(config)
        decoder = build_decoder(config)

        vq_layer = build_quantizer(config)
        # The training graph first: Keras checks a functional graph with the output count of a
        # layer's first call, and this call has one output more (the decoder's input) than the
        # quantizer model's.
        x_in = keras.Input((config.img_dim, config.img_dim, 3), name="image")
        z = encoder(x_in)
        _, e, decoder_in = vq_layer(z, return_decoder_input=True)
        x_rec = decoder(decoder_in)
        objective = VQVAEObjective.for_quantizer(vq_layer, config.beta, name="objective")
        train_model = TrainModel(x_in, objective([x_in, x_rec, z, e]), name="vqvae")

        z_in = keras.Input(encoder.output.shape[1:], name="latent")
        quantizer = keras.Model(z_in, vq_layer(z_in), name="quantizer")
    return VQVAE(config, encoder, quantizer, decoder, train_model, vq_layer)


def build_two_level_vqvae(config: Config) -> VQVAE:
    """VQ-VAE-2 (Razavi et al. 2019) on the reference's blocks: the bottom encoder as the
    reference's (img_dim/4), a top encoder one stride-2 stage further (img_dim/8) with its own
    quantizer, the bottom latents conditioned on the top code vectors (build_bottom_latents), and a
    decoder that sees both levels' code vectors. The four models as build_vqvae's, each level's
    latents, codes and vectors a list [bottom, top] (VQVAE's docstring)."""
    with dtype_policy(config.precision), seeded_initializers(config.seed):
        features = build_encoder(config, name="bottom_encoder")
        top_encoder = build_top_encoder(config)
        bottom_latents = build_bottom_latents(config)
        decoder = build_decoder(config)
        vq_layer, top_vq_layer = build_quantizer(config), build_quantizer(config, top=True)

        # The training graph first (see build_vqvae). The top vectors the bottom level and the
        # decoder see carry the top quantizer's gradient estimator, so the reconstruction trains
        # the top encoder too.
        x_in = keras.Input((config.img_dim, config.img_dim, 3), name="image")
        f = features(x_in)
        z_top = top_encoder(f)
        _, e_top, top_in = top_vq_layer(z_top, return_decoder_input=True)
        z = bottom_latents([f, top_in])
        _, e, bottom_in = vq_layer(z, return_decoder_input=True)
        x_rec = decoder([bottom_in, top_in])
        objective = VQVAEObjective.for_quantizer(vq_layer, config.beta, levels=2, name="objective")
        train_model = TrainModel(x_in, objective([x_in, x_rec, z, e, z_top, e_top]), name="vqvae")

        # Inference: the bottom latents from the top's code vectors, the top quantizer as at
        # inference even when the encoder is called in training mode (k-means initialisation).
        x_in = keras.Input((config.img_dim, config.img_dim, 3), name="image")
        f = features(x_in)
        z_top = top_encoder(f)
        _, e_top = top_vq_layer(z_top, training=False)
        encoder = keras.Model(x_in, [bottom_latents([f, e_top]), z_top], name="encoder")

        z_in = keras.Input(encoder.output[0].shape[1:], name="latent")
        top_z_in = keras.Input(encoder.output[1].shape[1:], name="top_latent")
        codes, vectors = vq_layer(z_in)
        top_codes, top_vectors = top_vq_layer(top_z_in)
        quantizer = keras.Model([z_in, top_z_in], [codes, top_codes, vectors, top_vectors], name="quantizer")
    return VQVAE(config, encoder, quantizer, decoder, train_model, vq_layer, top_vq_layer)


def learning_rate(config: Config, total_steps=None, prior=False):
    """Adam's learning rate for the VQ-VAE (or with prior=True the prior: the prior_ fields): lr
    itself, as the reference, or a function of the optimizer's step (so a checkpoint, which keeps
    the step, resumes it exactly): a linear warm-up from 0 over warmup_steps, then lr (schedule
    "constant") or a cosine from lr down to lr * lr_min_ratio at total_steps, the run's last step."""
    field = lambda name: Config.stage_field(name, prior)  # noqa: E731
    lr, schedule, warmup, ratio = (getattr(config, field(name)) for name in OPTIMIZER_FIELDS)
    if not config.lr_scheduled(prior):
        return lr
    if total_steps is None and schedule == "cosine":
        raise UsageError(f"{field('lr_schedule')} cosine decays over the run: give its total_steps",
                         field("lr_schedule"))
    if total_steps is not None and warmup >= total_steps:
        raise UsageError(f"{field('warmup_steps')} {warmup} must be fewer than the run's {total_steps} steps",
                         field("warmup_steps"))
    # Keras's CosineDecay warms up from its initial rate to warmup_target, then decays over
    # decay_steps; alpha 1 keeps the target, which is the constant schedule's warm-up alone.
    if schedule == "cosine":
        decay_steps, alpha = total_steps - warmup, ratio
    else:
        decay_steps, alpha = 1, 1.0
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps, alpha=alpha, warmup_target=lr, warmup_steps=warmup)


def compile_vqvae(vqvae: VQVAE, total_steps=None) -> keras.Model:
    """Adam at config.lr (or its schedule over total_steps, learning_rate), XLA as config.jit_compile
    asks. The loss is the model's own (VQVAEObjective): nothing to pass here, and
    `train_model.compile(optimizer=...)` from user code does the same."""
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(vqvae.config, total_steps)),
                  jit_compile=backend.jit_compile(vqvae.config.jit_compile))
    return model
