"""FSQ, the rotation trick and the cosine codebook, against NumPy, and end to end."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.quantizers import FiniteScalarQuantizer, RotationTrick

from conftest import ROOT, TINY_FLAGS, call_main, run_cli, tiny_config, write_images

LEVELS = [3, 4, 5, 2]  # odd and even levels: the half-level offset matters for 4 and 2


def _fsq(levels=LEVELS, dim=6, seed=0):
    layer = FiniteScalarQuantizer(levels)
    layer.build((None, dim))
    rng = np.random.default_rng(seed)
    for weight in layer.weights:  # random biases too, so that a missed bias shows
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))
    return layer


def test_fsq_bound_rounding_and_codes_match_numbers_worked_out_by_hand():
    """The paper's bound tanh(h + tan(offset / half_l)) * half_l - offset, half_l = (L - 1)(1 - 1e-3) / 2,
    offset 1/2 for even L, worked out by hand for L = 5 (half_l 1.998, no offset: values -2..2) and
    L = 4 (half_l 1.4985, shift tan(0.5 / 1.4985) = 0.346627: values -2..1), with identity projections."""
    layer = FiniteScalarQuantizer([5, 4])
    layer.build((None, 2))
    layer.set_weights([np.eye(2), np.zeros(2), np.eye(2), np.zeros(2)])
    h = np.array([[-10, -10], [-0.6, -1], [0, 0], [0.3, 0.5], [10, 10]], np.float32)
    bounded = [[-1.998, -1.9985], [-1.07303, -1.36004], [0, -0.00043], [0.58204, 0.53292], [1.998, 0.9985]]
    np.testing.assert_allclose(np.asarray(layer.bound(h)), bounded, atol=2e-5)
    codes, vectors = (np.asarray(t) for t in layer(h))
    # rounded (-2, -2), (-1, -1), (0, 0), (1, 1), (2, 1); digits + (2, 2); code = d0 + 5 * d1
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, [0, 6, 12, 18, 19])
    # rounded / (L // 2): L = 5 -> {-1, -0.5, 0, 0.5, 1}, L = 4 -> {-1, -0.5, 0, 0.5}
    np.testing.assert_allclose(vectors, [[-1, -1], [-0.5, -0.5], [0, 0], [0.5, 0.5], [1, 0.5]], atol=1e-6)


def test_fsq_projects_in_and_out_around_the_bound():
    """Random projections and biases: the layer is the identity-projection layer above applied to
    z @ W_in + b_in, its code vectors mapped by W_out, b_out."""
    layer = _fsq()
    w_in, b_in, w_out, b_out = (w.numpy() for w in layer.weights)
    square = FiniteScalarQuantizer(LEVELS)
    square.build((None, len(LEVELS)))
    square.set_weights([np.eye(4), np.zeros(4), np.eye(4), np.zeros(4)])
    z = (3 * np.random.default_rng(1).normal(size=(4, 5, 5, 6))).astype(np.float32)  # saturates some channels
    codes, vectors = (np.asarray(t) for t in layer(z))
    square_codes, square_vectors = (np.asarray(t) for t in square(z @ w_in + b_in))
    np.testing.assert_array_equal(codes, square_codes)
    np.testing.assert_allclose(vectors, square_vectors @ w_out + b_out, atol=1e-4)
    for i, level in enumerate(LEVELS):  # every channel takes exactly its number of values
        assert len(np.unique(square_vectors[..., i])) == level


def test_fsq_codes_cover_the_mixed_radix_range_and_round_trip_through_lookup():
    layer = _fsq()
    n = int(np.prod(LEVELS))
    assert layer.num_codes == n == 120
    z = (4 * np.random.default_rng(2).normal(size=(2000, 6))).astype(np.float32)
    codes, vectors = (np.asarray(t) for t in layer(z))
    np.testing.assert_allclose(np.asarray(layer.lookup(codes)), vectors, atol=1e-5)  # codes -> vectors
    every = np.asarray(layer.lookup(np.arange(n)))
    w_out, b_out = (w.numpy() for w in layer.weights[2:])
    digits = np.stack(np.unravel_index(np.arange(n), LEVELS, order="F"), -1)  # NumPy's mixed radix
    np.testing.assert_allclose(every, (digits - np.array(LEVELS) // 2) / (np.array(LEVELS) // 2) @ w_out + b_out,
                               atol=1e-5)
    # vectors -> codes: with identity projections, a point inside each code's rounding cell (its
    # value pulled 20% towards the bound's centre, then the bound's tanh inverted) gives that code.
    square = FiniteScalarQuantizer(LEVELS)
    square.build((None, len(LEVELS)))
    square.set_weights([np.eye(4), np.zeros(4), np.eye(4), np.zeros(4)])
    codes = np.asarray(square(np.random.default_rng(3).uniform(-4, 4, (20000, 4)).astype(np.float32))[0])
    assert codes.min() == 0 and codes.max() == n - 1 and len(np.unique(codes)) == n  # the whole range, no more
    levels = np.array(LEVELS)
    half_l, offset = (levels - 1) * (1 - 1e-3) / 2, np.where(levels % 2 == 0, 0.5, 0.0)
    rounded = np.asarray(square.lookup(np.arange(n))) * (levels // 2)
    pre = np.arctanh(0.8 * (rounded + offset) / half_l) - np.tan(offset / half_l)
    np.testing.assert_array_equal(np.asarray(square(pre.astype(np.float32))[0]), np.arange(n))


def test_fsq_gradient_reaches_the_encoder_and_needs_no_codebook_loss():
    config = tiny_config(quantizer="fsq", fsq_levels=[2, 4], num_codes=8)
    vqvae = vqk.build_vqvae(config)
    assert isinstance(vqvae.vq_layer, FiniteScalarQuantizer)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    model = vqvae.train_model
    with tf.GradientTape() as tape:
        model(x, training=True)
        loss = tf.add_n(model.losses)
    grads = tape.gradient(loss, vqvae.encoder.trainable_variables + vqvae.vq_layer.trainable_variables)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    mse_x = float(np.mean((x - model(x, training=True)) ** 2))
    assert float(loss) == pytest.approx(mse_x, rel=1e-4)  # no commitment or codebook term


def _rotation_numpy(z, e, g):
    """R^T g per row, R = I - 2 r r^T + 2 q u^T (Fifty et al. 2024, eq. 4), by explicit matrices
    (without the paper's gain |e| / |z|: RotationTrick's docstring)."""
    grads = []
    for z_i, e_i, g_i in zip(z, e, g):
        u, q = z_i / np.linalg.norm(z_i), e_i / np.linalg.norm(e_i)
        r = (u + q) / np.linalg.norm(u + q)
        rotation = np.eye(len(z_i)) - 2 * np.outer(r, r) + 2 * np.outer(q, u)
        np.testing.assert_allclose(rotation @ u, q, atol=1e-10)  # it does turn z's direction into e's
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(len(z_i)), atol=1e-10)  # a rotation
        grads.append(rotation.T @ g_i)
    return np.array(grads)


def test_rotation_trick_forward_is_e_and_gradient_is_the_rotation_formula():
    rng = np.random.default_rng(0)
    z, e, g = (rng.normal(size=(5, 4)) for _ in range(3))
    z_t, e_t = tf.constant(z, tf.float32), tf.constant(e, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([z_t, e_t])
        out = RotationTrick()([z_t, e_t])
        loss = tf.reduce_sum(out * tf.constant(g, tf.float32))
    grad_z, grad_e = tape.gradient(loss, [z_t, e_t])
    np.testing.assert_array_equal(out.numpy(), e.astype(np.float32))
    np.testing.assert_allclose(grad_z.numpy(), _rotation_numpy(z, e, g), rtol=1e-4, atol=1e-5)
    assert grad_e is None or float(tf.reduce_max(tf.abs(grad_e))) == 0  # e reaches the loss through the losses only
    assert not np.allclose(grad_z.numpy(), g, atol=1e-2)  # not the straight-through copy


def test_rotation_trick_gradient_keeps_its_length_whatever_the_codebooks_scale():
    """The paper's gain |e| / |z| would scale this gradient by 1e-3 (codes 1000 times shorter than z,
    as the reference's +-0.05 codebook against |z| ~ 6 at the start) and by 1e8 for a z near 0:
    without it, the gradient to z is the incoming one turned, of the same length."""
    rng = np.random.default_rng(1)
    z, e, g = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    z[0] *= 1e-8

    def gradient(e):
        z_t = tf.constant(z, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(z_t)
            loss = tf.reduce_sum(RotationTrick()([z_t, tf.constant(e, tf.float32)]) * g)
        return tape.gradient(loss, z_t).numpy()

    grad = gradient(e)
    np.testing.assert_allclose(np.linalg.norm(grad, axis=-1), np.linalg.norm(g, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(grad, _rotation_numpy(z, e, g), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gradient(e * 1e-3), grad, rtol=1e-5, atol=1e-6)


def test_rotation_trick_model_gives_plain_vq_values_and_the_rotated_gradient_to_the_encoder():
    plain = vqk.build_vqvae(tiny_config())
    rotated = vqk.build_vqvae(tiny_config(rotation_trick=True))
    rotated.train_model.set_weights(plain.train_model.get_weights())
    assert rotated.vq_layer.rotation_trick and not plain.vq_layer.rotation_trick  # the quantizer's own estimator
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(rotated.train_model(x, training=False), plain.train_model(x, training=False), atol=1e-6)

    # The whole model's gradient to the encoder's weights, against the chain rule with NumPy's
    # rotation: dL/dz = R^T (dmse_x / de) + beta * 2 (z - e) / size (mse_e moves only the codebook).
    model, encoder = rotated.train_model, rotated.encoder
    with tf.GradientTape() as tape:
        model(x, training=True)
        loss = tf.add_n(model.losses)
    got = tape.gradient(loss, encoder.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        z = encoder(x, training=True)
        e = tf.constant(rotated.vq_layer(z)[1])
        tape.watch(e)
        mse_x = tf.reduce_mean(tf.square(x - rotated.decoder(e, training=True)))
    dim = z.shape[-1]
    z64, e64 = (np.asarray(t, np.float64).reshape(-1, dim) for t in (z, e))
    g = np.asarray(tape.gradient(mse_x, e), np.float64).reshape(-1, dim)
    commitment = 0.25 * 2 * (z64 - e64) / z64.size
    for through, expected_dz in (("rotation", _rotation_numpy(z64, e64, g)), ("straight-through", g)):
        output_gradients = tf.constant((expected_dz + commitment).reshape(z.shape), tf.float32)
        expected = tape.gradient(z, encoder.trainable_variables, output_gradients=output_gradients)
        close = [np.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(got, expected)]
        assert all(close) if through == "rotation" else not any(close[:1]), through  # the first conv's kernel


def test_cosine_nearest_code_matches_numpy_brute_force():
    layer = vqk.VectorQuantizer(16, cosine=True)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 5, 5, 6)).astype(np.float32) * rng.uniform(0.1, 10, (3, 5, 5, 1)).astype(np.float32)
    layer.build(z.shape)
    layer.codebook.assign(rng.normal(size=(16, 6)) * rng.uniform(0.1, 10, (16, 1)))  # norms differ: cosine matters
    codes, vectors = (np.asarray(t) for t in layer(z))
    codebook = layer.codebook.numpy()
    cosine = np.einsum("...d,kd->...k", z, codebook) / np.linalg.norm(z, axis=-1, keepdims=True) / np.linalg.norm(codebook, axis=-1)
    np.testing.assert_array_equal(codes, cosine.argmax(-1))
    assert (codes != (((z[..., None, :] - codebook) ** 2).sum(-1)).argmin(-1)).any()  # not the Euclidean choice
    np.testing.assert_allclose(vectors, codebook[codes] / np.linalg.norm(codebook[codes], axis=-1, keepdims=True),
                               atol=1e-6)


def test_cosine_codebook_rows_move_as_far_as_the_defaults_in_one_adam_step():
    """Both gather rows of the codebook, so Adam sees the same kind of gradient. Keras 3's Adam
    counts each use of a gathered row in its second moment on its own: a row used 16 times the
    same way moves 4 lr in one step, where a dense gradient (the codebook normalised before the
    gather) moves it lr: a cosine codebook that learnt 20 times slower than the default's."""
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(4, 6)).astype(np.float32)
    z = np.tile(codebook[1], (1, 1, 16, 1))  # 16 uses of code 1, the nearest by either measure
    w = np.tile(rng.normal(size=6).astype(np.float32), (1, 1, 16, 1))
    steps = {}
    for cosine in (False, True):
        layer = vqk.VectorQuantizer(4, cosine=cosine)
        layer.build(z.shape)
        layer.codebook.assign(codebook)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(z)[1] * w)
        keras.optimizers.Adam(1e-3).apply_gradients(zip(tape.gradient(loss, [layer.codebook]), [layer.codebook]))
        steps[cosine] = np.abs(layer.codebook.numpy() - codebook).max(axis=1)
    assert (steps[False] > 0).sum() == 1  # one code used
    np.testing.assert_allclose(steps[True], steps[False], rtol=1e-3)
    assert steps[False].max() > 3e-3, "Keras's Adam now moves a gathered row by lr: this test's reason is gone"


class CodebookSteps(keras.callbacks.Callback):
    """The quantizer's codebook before the first step (after k-means) and after each step."""

    def on_train_begin(self, logs=None):
        self.layer = self.model.get_layer("vector_quantizer")
        self.codebooks = [self.layer.codebook.numpy()]

    def on_train_batch_end(self, batch, logs=None):
        self.codebooks.append(self.layer.codebook.numpy())


def test_cosine_codebook_model_feeds_unit_vectors_with_ema_restarts_and_kmeans(tmp_path):
    """Unit vectors everywhere, and each option at work: k-means, EMA and restarts each leave a
    mark that the others cannot. 32 codes for 64 positions a batch: some go unused every step."""
    config = tiny_config(cosine_codebook=True, quantizer="ema", restart_dead=1, kmeans_init=True, jit_compile=False,
                         num_codes=32)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    steps = CodebookSteps()
    vqvae = vqk.train_vqvae(config, str(tmp_path / "run"), steps=3, data=images, callbacks=[steps])
    z = vqvae.encode(images)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vqvae.quantize(z)[1], axis=-1), 1, atol=1e-5)
    # k-means: centroids of unit vectors, not the uniform init (rows of norm <= 0.05 * sqrt(8) = 0.14).
    norms = [np.linalg.norm(codebook, axis=-1) for codebook in steps.codebooks]
    assert norms[0].min() > 0.3
    # EMA: the counts moved from their start (ones), and the codebook is the smoothed average.
    layer = vqvae.vq_layer
    counts, sums = layer.ema_counts.numpy(), layer.ema_sums.numpy()
    assert np.abs(counts - 1).max() > 0.01
    total = counts.sum()
    smoothed = (counts + layer.ema_epsilon) / (total + len(counts) * layer.ema_epsilon) * total
    np.testing.assert_allclose(layer.codebook.numpy(), sums / smoothed[:, None], rtol=1e-4, atol=1e-6)
    # Restarts: codes jump onto an encoder output (unit norm), which an EMA step (a weighted mean
    # of unit vectors and the code's old place) does not do.
    jumped = [(np.linalg.norm(after - before, axis=-1) > 0.05) & (np.abs(norm - 1) < 1e-5)
              for before, after, norm in zip(steps.codebooks, steps.codebooks[1:], norms[1:])]
    assert sum(j.sum() for j in jumped) >= 3, [int(j.sum()) for j in jumped]


OPTIONS = {
    "fsq": dict(quantizer="fsq", fsq_levels=[2, 4], num_codes=8),
    "rotation": dict(rotation_trick=True),
    "cosine": dict(cosine_codebook=True, quantizer="ema", restart_dead=2),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_saves_reloads_and_samples_in_process(option, tmp_path):
    # mixed precision: the quantization stays float32. No XLA: its compile time is most of this test.
    config = tiny_config(**OPTIONS[option], precision="mixed_bfloat16", jit_compile=False)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    run = str(tmp_path / "run")
    vqvae = vqk.train_vqvae(config, run, steps=2, data=images)
    assert vqvae.vq_layer.compute_dtype == "float32"
    saved = json.load(open(os.path.join(run, "config.json")))
    assert {k: saved[k] for k in OPTIONS[option]} == OPTIONS[option]
    loaded = vqk.load_run(run)
    whole = keras.saving.load_model(os.path.join(run, "vqvae.keras"), safe_mode=True)
    np.testing.assert_allclose(whole(images, training=False), loaded.vqvae.train_model(images, training=False), atol=1e-6)
    codes, vectors = loaded.vqvae.quantize(loaded.vqvae.encode(images))
    np.testing.assert_allclose(loaded.vqvae.codes_to_vectors(codes), vectors, atol=1e-5)
    drawn = np.random.default_rng(0).integers(0, config.num_codes, (2, *config.grid_shape))  # as a prior draws
    assert np.isfinite(loaded.vqvae.decode(loaded.vqvae.codes_to_vectors(drawn))).all()


def test_old_config_without_the_new_fields_loads_as_the_reference(tmp_path):
    record = json.loads(json.dumps(vqk.Config().to_dict()))
    for name in ("fsq_levels", "rotation_trick", "cosine_codebook"):
        del record[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    config = vqk.Config.load(str(path))
    assert (config.fsq_levels, config.rotation_trick, config.cosine_codebook) == (None, False, False)


@pytest.mark.parametrize("fields, message", [
    (dict(quantizer="fsq"), "fsq_levels are needed"),
    (dict(quantizer="fsq", fsq_levels=[4, 4]), "num_codes must be the product"),
    (dict(quantizer="fsq", fsq_levels=[1, 64]), "at least 2"),
    (dict(quantizer="fsq", fsq_levels=[4, 4, 4], kmeans_init=True), "not fsq"),
    (dict(fsq_levels=[4, 4, 4]), "apply to quantizer fsq"),
    (dict(quantizer="gumbel", rotation_trick=True), "rotation_trick applies to the vq and ema"),
    (dict(quantizer="fsq", fsq_levels=[4, 4, 4], cosine_codebook=True), "cosine_codebook applies"),
])
def test_config_rejects_combinations_that_do_not_apply(fields, message):
    with pytest.raises(vqk.UsageError, match=message):
        vqk.Config(**fields).validate()


def test_fsq_num_codes_is_derived_from_the_levels_on_the_command_line(tmp_path):
    import train

    data = write_images(tmp_path / "images", count=4, size=16)
    run = str(tmp_path / "run")
    flags = ["--img-dim", "16", "--z-dim", "8", "--batch-size", "4"]  # TINY_FLAGS without --num-codes
    status, _, err = call_main(train.main, ["vqvae", "--data", data, "--run", run, *flags, "--steps", "1", "--no-jit",
                                            "--quantizer", "fsq", "--fsq-levels", "3,3"])
    assert status == 0, err
    assert vqk.Config.load(os.path.join(run, "config.json")).num_codes == 9


@pytest.mark.slow
@pytest.mark.parametrize("option", ["fsq", "rotation", "cosine"])
def test_each_option_end_to_end_through_the_cli(option, tmp_path):
    """train.py vqvae -> train.py prior -> sample.py random, then the run and its .keras file
    reloaded in a fresh process give this process's reconstructions."""
    flags = {"fsq": ["--quantizer", "fsq", "--fsq-levels", "2,4"], "rotation": ["--rotation-trick"],
             "cosine": ["--cosine-codebook", "--quantizer", "ema", "--kmeans-init", "--restart-dead", "2"]}[option]
    data = write_images(tmp_path / "images", count=12)
    run = str(tmp_path / "run")
    run_cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "4", "--sample-every", "2", *flags)
    config = vqk.Config.load(os.path.join(run, "config.json"))
    config.prior_heads, config.prior_head_dim, config.prior_depth = 2, 4, 2  # tests only: a tiny prior
    config.save(os.path.join(run, "config.json"))
    run_cli("train.py", "prior", "--run", run, "--steps", "2", "--batch-size", "4")
    run_cli("sample.py", "random", "--run", run, "--n", "2", "--seed", "0", "--out", str(tmp_path / "random.png"))
    assert os.path.getsize(tmp_path / "random.png") > 0
    images = vqk.load_images(data, 16)
    np.save(tmp_path / "x.npy", images)
    script = f"""
import keras, numpy as np, vq_vae_keras as vqk
x = np.load({str(tmp_path / 'x.npy')!r})
whole = keras.saving.load_model({os.path.join(run, 'vqvae.keras')!r}, safe_mode=True)
np.save({str(tmp_path / 'whole.npy')!r}, whole.predict(x, verbose=0))
np.save({str(tmp_path / 'recon.npy')!r}, vqk.load_run({run!r}).vqvae.reconstruct(x))
"""
    run_cli("-c", script)
    here = vqk.load_run(run)
    np.testing.assert_allclose(np.load(tmp_path / "recon.npy"), here.vqvae.reconstruct(images), atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "whole.npy"), here.vqvae.train_model.predict(images, verbose=0),
                               atol=1e-6)


def test_fsq_has_no_seed_and_older_configs_with_one_still_load():
    layer = FiniteScalarQuantizer(LEVELS, name="fsq_quantizer")
    config = layer.get_config()
    assert "seed" not in config and "num_codes" not in config
    again = FiniteScalarQuantizer.from_config({**config, "seed": 0})  # as files saved before carried it
    assert again.levels == LEVELS and again.num_codes == 120
    old_objective = vqk.models.VQVAEObjective.from_config({"name": "objective", "beta": 0.25, "codebook_weight": 1.0,
                                                           "gumbel": True})
    assert not old_objective.codebook_terms


KINDS = {
    "vq": dict(), "ema": dict(quantizer="ema"), "gumbel": dict(quantizer="gumbel"),
    "fsq": dict(quantizer="fsq", fsq_levels=[2, 4], num_codes=8),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_quantizer_answers_the_protocol_the_model_is_built_from(kind):
    """The factory's layer, its class's answers, the config's option table and the objective agree."""
    from vq_vae_keras.quantizers import CodebookLayer, build_quantizer, quantizer_class

    config = tiny_config(**KINDS[kind])
    layer = build_quantizer(config)
    assert isinstance(layer, CodebookLayer) and type(layer) is quantizer_class(config)
    assert layer.codebook_terms == config.takes("beta")  # no commitment term, no beta
    assert layer.codebook_weight == (0.0 if kind == "ema" else 1.0)
    names = vqk.models.metric_names(config)
    assert names == ["loss", "mse_x", *(["mse_e", "mse_z"] if layer.codebook_terms else []), *layer.metric_names,
                     "perplexity", "usage"]
    log = vqk.models.log_names(config)
    assert log == (["loss", "mse_x", "kl", "temperature", "perplexity", "usage"] if kind == "gumbel" else names)
    callbacks = layer.training_callbacks(config, 0)
    assert [type(c).__name__ for c in callbacks] == (["GumbelAnneal"] if kind == "gumbel" else [])
    vqvae = vqk.build_vqvae(config)
    objective = vqvae.train_model.get_layer("objective")
    assert (objective.codebook_terms, objective.codebook_weight) == (layer.codebook_terms, layer.codebook_weight)
    # Layers by name, as runs saved them: the quantizer's estimator is inside it, not a layer of its own.
    assert [lyr.name for lyr in vqvae.train_model.layers] == ["image", "encoder", layer.name, "decoder", "objective"]


@pytest.mark.parametrize("kind", list(KINDS) + ["rotation"])
def test_the_decoder_input_has_the_code_vectors_values_in_both_modes(kind):
    """layer(z) is [codes, code vectors]; return_decoder_input=True adds what the decoder sees: the
    code vectors' values (up to the rounding of z + (e - z)), the same codes."""
    config = tiny_config(**({"rotation_trick": True} if kind == "rotation" else KINDS[kind]))
    layer = vqk.models.build_quantizer(config)
    z = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    for training in (False, True):
        codes, vectors, decoder_input = (np.asarray(t) for t in layer(z, training=training, return_decoder_input=True))
        np.testing.assert_allclose(decoder_input, vectors, atol=1e-6)
        if not training:  # (training moves an EMA codebook after its call)
            np.testing.assert_array_equal(codes, np.asarray(layer(z)[0]))
    assert len(layer(z)) == 2


def test_gumbel_training_callbacks_anneal_the_temperature_by_the_global_step():
    """The quantizer's own callback sets the schedule's temperature before each step, from the
    step training starts at, and logs it."""
    config = tiny_config(quantizer="gumbel", gumbel_anneal_steps=4, jit_compile=False)
    vqvae = vqk.build_vqvae(config)
    model = vqk.models.compile_vqvae(vqvae)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((float(vqvae.vq_layer.temperature.numpy()), logs["temperature"]))

    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    callbacks = vqvae.vq_layer.training_callbacks(config, 2)
    model.fit(np.repeat(images, 3, 0), batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[*callbacks, Record()])
    expected = [config.gumbel_temperature_at(step) for step in (2, 3, 4)]
    np.testing.assert_allclose([s[0] for s in seen], expected, rtol=1e-6)
    assert [s[1] for s in seen] == expected


def test_beta_is_refused_for_the_quantizers_without_a_commitment_term(tmp_path):
    import train

    data = write_images(tmp_path / "images", count=4, size=16)
    for quantizer in ("gumbel", "fsq"):
        extra = ["--fsq-levels", "2,4"] if quantizer == "fsq" else []
        status, _, err = call_main(train.main, ["vqvae", "--data", data, "--run", str(tmp_path / quantizer), *TINY_FLAGS,
                                                "--steps", "1", "--quantizer", quantizer, *extra, "--beta", "0.5"])
        assert status == 2 and f"--beta (the commitment weight) does not apply to --quantizer {quantizer}" in err, err


def test_the_option_table_says_which_quantizer_takes_which_option():
    takes = {kind: {name for name in ("beta", "rotation_trick", "kmeans_init", "fsq_levels", "ema_decay",
                                      "gumbel_temperature", "lr")
                    if tiny_config(**KINDS[kind]).takes(name)} for kind in KINDS}
    assert takes == {"vq": {"beta", "rotation_trick", "kmeans_init", "lr"},
                     "ema": {"beta", "rotation_trick", "kmeans_init", "ema_decay", "lr"},
                     "gumbel": {"gumbel_temperature", "lr"}, "fsq": {"fsq_levels", "lr"}}
    vqk.Config(quantizer="vq", ema_decay=0.5, gumbel_temperature=2.0).validate()  # set, not on: Python accepts it


def test_only_the_config_and_the_factory_compare_the_quantizers_name():
    """One protocol: the rest of the package asks the layer (or Config.takes), never the name."""
    import re

    package = os.path.join(ROOT, "vq_vae_keras")
    comparison = re.compile(r"quantizer\s*(==|!=|in\b|not in\b)")
    found = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.relpath(path, package) not in ("config.py", "quantizers.py"):
                with open(path) as f:
                    found += [f"{path}:{i}" for i, line in enumerate(f, 1) if comparison.search(line)]
    assert found == []


def numpy_fsq_unquantized(z, levels, w_in, b_in, w_out, b_out):
    """FSQ without its rounding, from the paper's formulas: the bounded channels / (L // 2), projected out."""
    levels = np.asarray(levels, np.float64)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z @ w_in + b_in + np.tan(offset / half_l)) * half_l - offset
    return (bounded / (levels // 2)) @ w_out + b_out


def test_unquantized_is_z_for_vq_the_unrounded_channels_for_fsq_and_the_noiseless_mixture_for_gumbel():
    z = np.random.default_rng(2).normal(size=(3, 4, 6)).astype(np.float32)
    fsq = _fsq()
    np.testing.assert_allclose(np.asarray(fsq.unquantized(z)),
                               numpy_fsq_unquantized(z, LEVELS, *(w.numpy() for w in fsq.weights)), atol=1e-4)
    gumbel = vqk.quantizers.GumbelQuantizer(5, temperature=0.5, seed=0)
    gumbel.build((None, 6))
    gumbel.temperature.assign(0.2)  # annealed: the current temperature, not the initial one
    gumbel.logit_bias.assign(np.random.default_rng(3).normal(size=5).astype(np.float32))  # a dropped bias shows
    logits = (z @ gumbel.logit_kernel.numpy() + gumbel.logit_bias.numpy()) / 0.2
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(gumbel.unquantized(z)),
                               soft / soft.sum(-1, keepdims=True) @ gumbel.codebook.numpy(), atol=1e-5)
    vq = vqk.quantizers.VectorQuantizer(5)
    vq.build((None, 6))
    np.testing.assert_array_equal(np.asarray(vq.unquantized(z)), z)


@pytest.mark.parametrize("levels,precision", [(1, "float32"), (2, "float32"), (1, "mixed_bfloat16")])
def test_an_fsq_models_unquantized_reconstruction_decodes_the_unrounded_channels(levels, precision):
    """recon --no-quantize, test_ae_1 grids and evaluate's psnr_unquantized: the decoder gets FSQ's
    unrounded channels projected out (NumPy), not the encoder's output, which FSQ's projection expects;
    under mixed precision too (16-bit latents into the float32 quantizer)."""
    config = tiny_config(quantizer="fsq", fsq_levels=[2, 4], num_codes=8, levels=levels, precision=precision)
    vqvae = vqk.build_vqvae(config)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    z = vqvae.encode(x)
    z = z if levels == 2 else [z]
    expected = [numpy_fsq_unquantized(np.asarray(level, np.float32), [2, 4], *(w.numpy() for w in layer.weights))
                for layer, level in zip(vqvae.vq_layers, z)]
    expected = vqvae.decoder.predict(expected if levels == 2 else expected[0], verbose=0)
    # bfloat16's decoder rounds its activations to 8 bits of mantissa; decoding z itself is off by ~0.1
    np.testing.assert_allclose(vqvae.reconstruct(x, quantize=False), expected, atol=1e-4 if precision == "float32" else 2e-2)


def test_the_readmes_recommended_set_is_the_benchs_and_trains_as_written(tmp_path):
    """README's "recommended:" flags are exactly the set bench/codebook_health.py measured
    (RECOMMENDED: no flag more, none less), and train.py accepts them as written: a 301-step run,
    one step past the warm-up."""
    import dataclasses
    import importlib.util
    import re
    import shlex

    import train

    with open(os.path.join(ROOT, "README.md")) as f:
        found = re.search(r"\*\*recommended:\*\* `([^`]+)`", f.read())
    assert found, "README.md has no '**recommended:** `FLAGS`' row in its table of codebook options"
    spec = importlib.util.spec_from_file_location("codebook_health", os.path.join(ROOT, "bench", "codebook_health.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    data = write_images(tmp_path / "images", count=4, size=16)
    run = str(tmp_path / "run")
    status, _, err = call_main(train.main, ["vqvae", "--data", data, "--run", run, "--img-dim", "16", "--z-dim", "4",
                                            "--batch-size", "4", "--steps", "301", *shlex.split(found.group(1))])
    assert status == 0, err
    ours = {"data", "img_dim", "z_dim", "batch_size", "jit_compile"}  # what this test sets (and train.py's --no-jit default)
    config = vqk.Config.load(os.path.join(run, "config.json"))
    expected = vqk.Config(**bench.RECOMMENDED)
    for field in dataclasses.fields(vqk.Config):
        if field.name not in ours:
            assert getattr(config, field.name) == getattr(expected, field.name), field.name
