"""The model owns its loss: Keras's own compile/fit from user code trains every term, with NumPy
checks of the loss, the EMA codebook and dead-code restarts inside fit; XLA and mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk

from conftest import tiny_config


def images(n=8, size=16, seed=0):
    """Smooth images in [-1, 1] (learnable: a colour gradient each)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)[None, :, None, None]
    a, b = rng.uniform(-1, 1, (n, 1, 1, 3)), rng.uniform(-1, 1, (n, 1, 1, 3))
    return np.broadcast_to(a * (1 - t) + b * t, (n, size, size, 3)).astype(np.float32)


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batch_logs, self.epoch_logs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append(dict(logs))


@pytest.mark.parametrize("kind", ["array", "dataset"])
def test_fit_from_user_code_trains_every_term(kind):
    keras.utils.set_random_seed(0)
    vqvae = vqk.build_vqvae(tiny_config())
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    x = images(16)
    data = x if kind == "array" else tf.data.Dataset.from_tensor_slices(x).batch(8)
    kernel = vqvae.decoder.get_layer("deconv2").kernel
    before = kernel.numpy().copy()
    recorder = Recorder()
    history = model.fit(data, batch_size=8, epochs=15, verbose=0, callbacks=[recorder])
    # The decoder learns from the reconstruction term (Keras warned "Gradients do not exist" before).
    assert not np.allclose(kernel.numpy(), before)
    for key in ("loss", "mse_x", "mse_e", "mse_z", "perplexity", "usage"):
        assert key in history.history and key in recorder.batch_logs[-1] and key in recorder.epoch_logs[-1]
    mse_x = history.history["mse_x"]
    assert mse_x[-1] < 0.7 * mse_x[0]


def test_logged_loss_is_the_reference_objective_against_numpy():
    """One SGD step: the logged values against NumPy on the model's own forward pass, and the
    codebook's update, which only mse_e (weight 1) moves: beta on the wrong term fails here."""
    beta, lr = 0.4, 0.5
    keras.utils.set_random_seed(3)
    vqvae = vqk.build_vqvae(tiny_config(beta=beta))
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.SGD(lr))
    x = images(4, seed=1)
    # Training-mode BatchNorm uses the batch's statistics: the same forward pass as the step's.
    x_rec = model(x, training=True).numpy()
    z = vqvae.encoder(x, training=True).numpy().astype(np.float64)
    codebook = vqvae.vq_layer.codebook.numpy().astype(np.float64)
    codes = ((z[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
    e = codebook[codes]
    assert np.abs(z - e).mean() > 1e-3  # z and e differ: the terms are not trivially zero

    logs = model.train_on_batch(x, return_dict=True)
    mse_x = ((x - x_rec) ** 2).mean()
    mse_ze = ((z - e) ** 2).mean()
    np.testing.assert_allclose(logs["mse_x"], mse_x, rtol=1e-5)
    np.testing.assert_allclose(logs["mse_e"], mse_ze, rtol=1e-5)
    np.testing.assert_allclose(logs["mse_z"], mse_ze, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], mse_x + mse_ze + beta * mse_ze, rtol=1e-5)
    # d(mse_e)/d(e_k) = 2 (e_k - z) / n summed over the positions assigned to k; SGD moves by -lr * grad.
    grad = np.zeros_like(codebook)
    np.add.at(grad, codes.ravel(), 2 * (e - z).reshape(-1, z.shape[-1]) / z.size)
    np.testing.assert_allclose(vqvae.vq_layer.codebook.numpy(), codebook - lr * grad, rtol=1e-4, atol=1e-7)


class CodebookRecorder(keras.callbacks.Callback):
    """Before each step: the encoder outputs of the (fixed) batch and the codebook."""

    def __init__(self, vqvae, x):
        super().__init__()
        self.vqvae, self.x, self.steps = vqvae, x, []

    def on_train_batch_begin(self, batch, logs=None):
        z = self.vqvae.encoder(self.x, training=True).numpy().astype(np.float64)
        self.steps.append((z, self.vqvae.vq_layer.codebook.numpy().astype(np.float64)))


def test_ema_codebook_inside_fit_matches_a_numpy_replay():
    d, eps, k = 0.9, 1e-5, 8
    keras.utils.set_random_seed(4)
    vqvae = vqk.build_vqvae(tiny_config(quantizer="ema", ema_decay=d, ema_epsilon=eps))
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = images(4, seed=2)
    recorder = CodebookRecorder(vqvae, x)
    model.fit(x, batch_size=4, epochs=4, shuffle=False, verbose=0, callbacks=[recorder])

    counts, sums = np.ones(k), recorder.steps[0][1].copy()  # as if each code was assigned once to itself
    codebook = sums.copy()
    for z, recorded in recorder.steps:
        np.testing.assert_allclose(recorded, codebook, rtol=1e-4, atol=1e-6)
        flat = z.reshape(-1, z.shape[-1])
        codes = ((flat[:, None] - codebook) ** 2).sum(-1).argmin(-1)
        onehot = np.eye(k)[codes]
        counts = d * counts + (1 - d) * onehot.sum(0)
        sums = d * sums + (1 - d) * onehot.T @ flat
        smoothed = (counts + eps) / (counts.sum() + k * eps) * counts.sum()
        codebook = sums / smoothed[:, None]
    np.testing.assert_allclose(vqvae.vq_layer.codebook.numpy(), codebook, rtol=1e-4, atol=1e-6)


def test_dead_codes_restart_inside_fit():
    keras.utils.set_random_seed(5)
    vqvae = vqk.build_vqvae(tiny_config(restart_dead=1))
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x = images(4, seed=3)
    z = vqvae.encoder(x, training=True).numpy()
    layer = vqvae.vq_layer
    far = layer.codebook.numpy()
    far[6:] = 100.0  # codes 6 and 7 are nobody's nearest: idle this step
    layer.codebook.assign(far)
    model.fit(x, batch_size=4, epochs=1, verbose=0)
    moved = layer.codebook.numpy()[6:]
    flat = z.reshape(-1, z.shape[-1])
    for row in moved:  # each idle code now sits on one of the batch's encoder outputs
        assert np.abs(flat - row).max(axis=1).min() < 1e-5


def test_xla_gives_the_same_losses():
    x = images(8, seed=4)
    losses = {}
    for jit in (False, True):
        keras.utils.set_random_seed(6)
        vqvae = vqk.build_vqvae(tiny_config(jit_compile=jit))
        model = vqk.models.compile_vqvae(vqvae)
        assert model.jit_compile is jit  # Keras turns XLA off quietly when it cannot run it
        losses[jit] = [model.train_on_batch(x, return_dict=True)["loss"] for _ in range(4)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_steps_are_finite_and_codes_match_float32(precision):
    policy = keras.config.dtype_policy().name
    keras.utils.set_random_seed(7)
    vqvae = vqk.build_vqvae(tiny_config(precision=precision))
    assert keras.config.dtype_policy().name == policy  # the process-wide policy is left as it was
    assert vqvae.encoder.get_layer("conv1").compute_dtype == precision.split("_")[1]
    assert vqvae.vq_layer.compute_dtype == "float32" and vqvae.vq_layer.codebook.dtype == "float32"
    model = vqk.models.compile_vqvae(vqvae)
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = images(8, seed=5)
    for _ in range(3):
        logs = model.train_on_batch(x, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values())
    # Codes are picked in float32 on the encoder's own 16-bit output, inside train_model: near-ties
    # that distances |z|^2 + |e|^2 - 2 z.e (about 80 here) in 8-bit (bfloat16) or 11-bit (float16)
    # arithmetic get wrong are picked as float64 NumPy picks them. The codebook: 8 of the encoder's
    # outputs (their mean direction taken out), shrunk to 0.2 and moved 3 out along every axis.
    low = precision.split("_")[1]
    objective = model.get_layer("objective")
    probe = keras.Model(model.input, objective.input[2:])  # z and e as the objective receives them
    assert probe.outputs[0].dtype in (low, "float32")  # Keras 3.9.2 reads the symbolic z as float32
    z = keras.ops.convert_to_numpy(keras.ops.cast(probe(x, training=True)[0], "float32"))
    w = z.reshape(-1, 8)[::16][:8]
    w = w - w.mean(-1, keepdims=True)
    codebook = (3 + 0.2 * w / np.linalg.norm(w, axis=-1, keepdims=True)).astype(np.float32)
    vqvae.vq_layer.codebook.assign(codebook)
    z, e = (keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")) for t in probe(x, training=True))
    expected = np.argmin(((z[..., None, :].astype(np.float64) - codebook) ** 2).sum(-1), axis=-1)
    assert len(np.unique(expected)) >= 4
    np.testing.assert_array_equal(e, codebook[expected])  # each e is the row of its float64 code
    z_low, codebook_low = tf.cast(z, low), tf.cast(codebook, low)  # the same distances in 16 bits
    low_distances = (tf.reduce_sum(z_low ** 2, -1, keepdims=True) + tf.reduce_sum(codebook_low ** 2, -1)
                     - 2 * tf.einsum("...d,kd->...k", z_low, codebook_low))
    assert (np.argmin(tf.cast(low_distances, "float32").numpy(), -1) != expected).any()  # the check has teeth
    reference = vqk.build_vqvae(tiny_config())
    # Weights are float32 in every policy: a float32 model loads them.
    reference.train_model.set_weights(model.get_weights())


def test_reset_metrics_makes_the_logs_per_batch_values_compile_metrics_included():
    """The loop's per-step rows: with ResetMetrics(1) each batch's logs are that batch's values,
    for compile()'s metrics (the prior's accuracy) as well as the loss: a batch's accuracy over
    2 x 16 targets is a multiple of 1/32, a running mean over several batches in general is not."""
    from vq_vae_keras.callbacks import ResetMetrics

    config = tiny_config(prior_depth=1)
    prior = vqk.build_prior(config)
    prior.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 9, (12, 16)), rng.integers(0, 8, (12, 16))
    recorder = Recorder()
    prior.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[ResetMetrics(1, 0), recorder])
    accuracy = np.array([logs["accuracy"] for logs in recorder.batch_logs])
    np.testing.assert_allclose(accuracy * 32, np.round(accuracy * 32), atol=1e-4)


def test_the_run_callbacks_work_in_a_user_fit(tmp_path):
    """Grids, checkpoints and the NaN guard of train.py, added to a plain fit: the checkpoint
    restores the weights and Adam's state of the step it was written at."""
    keras.utils.set_random_seed(2)
    config = tiny_config()
    vqvae = vqk.build_vqvae(config)
    model = vqvae.train_model
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    weights, checkpoint = str(tmp_path / "vqvae.weights.h5"), str(tmp_path / "ckpt.npz")
    x = images(32)
    model.fit(x, batch_size=4, epochs=1, verbose=0, callbacks=[
        vqk.callbacks.NanGuard(), vqk.callbacks.ReconstructionGrids(vqvae, x, str(tmp_path), every=3),
        vqk.callbacks.Checkpoint(weights, checkpoint, every=3)])
    # steps 1, 4, 7 and the end (8): the reference's numbering of grids is the batch index
    assert sorted(p.name for p in tmp_path.glob("test_ae_2_*.png")) == [f"test_ae_2_{i}.png" for i in (0, 3, 6, 7)]
    fresh = vqk.build_vqvae(config).train_model
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert vqk.io.load_checkpoint(checkpoint, fresh, fresh.optimizer)["step"] == 8
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides", [dict(), dict(quantizer="ema"), dict(quantizer="gumbel"),
                                       dict(quantizer="fsq", fsq_levels=[2, 4], num_codes=8)])
def test_metric_names_are_the_keys_the_model_logs(overrides):
    """metric_names(config) is what a training step reports: FSQ and Gumbel report no mse_e or
    mse_z (no such terms in their objective)."""
    config = tiny_config(**overrides)
    model = vqk.models.compile_vqvae(vqk.build_vqvae(config))
    logs = model.train_on_batch(images(4), return_dict=True)
    names = vqk.models.metric_names(config)
    assert sorted(logs) == sorted(names) and names[:2] == ["loss", "mse_x"]
    assert ("mse_z" in names) == (config.quantizer in ("vq", "ema"))


def test_fused_batch_norm_matches_numpy_and_keras_own():
    """The package's BatchNormalization trains with TensorFlow's fused kernel: the output and the
    moving statistics are NumPy's batch norm (biased variance, as Keras's), the gradients Keras's own."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(2, 3, (6, 5, 5, 4)).astype(np.float32), rng.normal(0, 1, (6, 5, 5, 4)).astype(np.float32)
    layers = {"fused": vqk.models.BatchNormalization(momentum=0.9),
              "keras": keras.layers.BatchNormalization(momentum=0.9)}
    results = {}
    for name, layer in layers.items():
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2, 4))
        layer.beta.assign(np.linspace(-1, 1, 4))
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * w)
        results[name] = [y, *tape.gradient(loss, [xt, layer.gamma, layer.beta])]
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    expected = np.linspace(0.5, 2, 4) * (x - mean) / np.sqrt(var + 1e-3) + np.linspace(-1, 1, 4)
    np.testing.assert_allclose(results["fused"][0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers["fused"].moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(layers["fused"].moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
    for fused, own in zip(results["fused"][1:], results["keras"][1:]):
        np.testing.assert_allclose(fused, own, rtol=1e-4, atol=1e-4 * np.abs(own).max())
    # Keras's own path computes the same numbers: the fused kernel must be what actually ran.
    ops_of = lambda layer: {op.type for op in tf.function(lambda t: layer(t, training=True))  # noqa: E731
                            .get_concrete_function(tf.TensorSpec(x.shape)).graph.get_operations()}
    assert any(op.startswith("FusedBatchNorm") for op in ops_of(layers["fused"]))
    assert not any(op.startswith("FusedBatchNorm") for op in ops_of(layers["keras"]))


def test_fused_batch_norm_trains_as_keras_own_did():
    """A few steps with the fused batch norm against the same model on Keras's own
    BatchNormalization call (the path before): the same losses and weights within float noise,
    the same codes, and weights that load into either. SGD, not Adam: a conv bias before a batch
    norm has a gradient of zero up to float noise, which Adam would scale to full steps on both paths."""
    x = images(8, seed=6)
    runs = {}
    for fused in (True, False):
        keras.utils.set_random_seed(8)
        vqvae = vqk.build_vqvae(tiny_config(jit_compile=False))
        if not fused:
            for layer in [*vqvae.encoder.layers, *vqvae.decoder.layers]:
                if isinstance(layer, vqk.models.BatchNormalization):
                    layer.call = keras.layers.BatchNormalization.call.__get__(layer)
        model = vqvae.train_model
        model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
        losses = [model.train_on_batch(x, return_dict=True)["loss"] for _ in range(4)]
        runs[fused] = losses, model.get_weights(), vqvae.quantize(vqvae.encode(x))[0], vqvae
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(runs[True][2], runs[False][2])
    runs[True][3].train_model.set_weights(runs[False][1])  # same weights, same names: one loads into the other
    np.testing.assert_allclose(runs[True][3].encode(x), runs[False][3].encode(x), rtol=1e-6, atol=1e-6)


def test_the_default_plain_graph_trains_as_xla_did(tmp_path):
    """jit_compile is off by default since XLA's CPU convolutions measured slower than oneDNN's
    (bench/README.md): a few steps without XLA give the losses, weights and codes of the same steps
    with XLA (the default before), within float noise, and weights saved by one load into the other.
    SGD for the reason given in test_fused_batch_norm_trains_as_keras_own_did."""
    assert vqk.Config().jit_compile is False
    x = images(8, seed=9)
    runs = {}
    for jit in (True, False):
        keras.utils.set_random_seed(10)
        vqvae = vqk.build_vqvae(tiny_config(jit_compile=jit))
        model = vqvae.train_model
        model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit)
        losses = [model.train_on_batch(x, return_dict=True)["loss"] for _ in range(4)]
        assert model.jit_compile is jit
        runs[jit] = losses, model.get_weights(), vqvae.quantize(vqvae.encode(x))[0], vqvae
    np.testing.assert_allclose(runs[False][0], runs[True][0], rtol=1e-5)
    for a, b in zip(runs[False][1], runs[True][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(runs[False][2], runs[True][2])
    path = str(tmp_path / "xla.weights.h5")
    runs[True][3].train_model.save_weights(path)
    runs[False][3].train_model.load_weights(path)
    for a, b in zip(runs[False][3].train_model.get_weights(), runs[True][1]):
        np.testing.assert_array_equal(a, b)
