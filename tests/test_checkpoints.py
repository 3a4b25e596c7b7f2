"""Checkpoints restore by variable name: any order, the encoder told from the decoder, a misfit refused."""

import re

import keras
import numpy as np
import pytest

import vq_vae_keras as vqk
from vq_vae_keras.errors import UsageError
from vq_vae_keras.io import load_checkpoint, save_checkpoint
from vq_vae_keras.models import compile_vqvae

from conftest import tiny_config


def prior_with_optimizer(seed=0):
    prior = vqk.build_prior(tiny_config())
    prior.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    prior.optimizer.build(prior.trainable_variables)
    rng = np.random.default_rng(seed)
    for variable in [*prior.variables, *prior.optimizer.variables]:  # every value distinct
        if "float" in str(variable.dtype):
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return prior


def test_checkpoint_restores_each_array_into_the_variable_of_its_name(tmp_path):
    source = prior_with_optimizer(seed=1)
    path = str(tmp_path / "prior.npz")
    save_checkpoint(path, source, source.optimizer, {"step": 7})
    with np.load(path) as archive:
        saved = dict(archive)
    # The same arrays written in reverse order: a loader matching by position would scramble them.
    reordered = str(tmp_path / "reordered.npz")
    np.savez(reordered, **dict(reversed(list(saved.items()))))

    target = prior_with_optimizer(seed=2)
    assert load_checkpoint(reordered, target, target.optimizer) == {"step": 7}
    for mine, theirs in zip(target.variables, source.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    # Adam's slots land on the slots of the same model variable (checked through the optimizer itself).
    opt = target.optimizer
    for variable in target.trainable_variables:
        index = opt._get_variable_index(variable)
        name = variable.path  # the prior has no sub-models: its names are the Keras paths
        np.testing.assert_array_equal(opt._momentums[index].numpy(), saved[f"optimizer/{name}/momentum"])
        np.testing.assert_array_equal(opt._velocities[index].numpy(), saved[f"optimizer/{name}/velocity"])


def test_vqvae_checkpoint_tells_the_encoder_from_the_decoder(tmp_path):
    """Both sub-models have a layer "bn1": their variables and Adam slots must not be confused."""
    def model(seed):
        vqvae = vqk.build_vqvae(tiny_config())
        m = compile_vqvae(vqvae)
        m.optimizer.build(m.trainable_variables)
        rng = np.random.default_rng(seed)
        for variable in [*m.variables, *m.optimizer.variables]:
            if "float" in str(variable.dtype):
                variable.assign(rng.normal(size=variable.shape).astype("float32"))
        return vqvae, m

    (source, m1), (target, m2) = model(1), model(2)
    path = str(tmp_path / "vqvae.npz")
    save_checkpoint(path, m1, m1.optimizer, {"step": 1})
    with np.load(path) as archive:
        keys = set(archive)
    assert {"model/encoder/bn1/gamma", "model/decoder/bn1/gamma", "optimizer/encoder/bn1/gamma/momentum",
            "optimizer/decoder/bn1/gamma/momentum"} <= keys
    load_checkpoint(path, m2, m2.optimizer)
    for a, b in [(source.encoder, target.encoder), (source.decoder, target.decoder)]:
        for x, y in zip(a.variables, b.variables):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    for x, y in zip(m1.optimizer.variables, m2.optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def rewrite(path, change):
    with np.load(path) as archive:
        arrays = dict(archive)
    change(arrays)
    np.savez(path, **arrays)


def rename(arrays, old, new):
    arrays[new] = arrays.pop(old)


@pytest.mark.parametrize("change, message", [
    (lambda a: rename(a, "model/block1_attention/query", "model/block9_attention/query"),
     "missing model/block1_attention/query; unexpected model/block9_attention/query"),
    (lambda a: a.pop("optimizer/next_code/bias/velocity"), "missing optimizer/next_code/bias/velocity"),
    (lambda a: a.update({"model/extra/kernel": np.zeros(3)}), "unexpected model/extra/kernel"),
    (lambda a: a.update({"model/next_code/bias": np.zeros(5, np.float32)}), "other shapes for model/next_code/bias"),
    (lambda a: [a.pop("format")] + [rename(a, k, f"model/{i}") for i, k in enumerate(sorted(a)) if k.startswith("model/")],
     "older format"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, change, message):
    source = prior_with_optimizer(seed=1)
    path = str(tmp_path / "prior.npz")
    save_checkpoint(path, source, source.optimizer, {"step": 3})
    rewrite(path, change)
    target = prior_with_optimizer(seed=2)
    before = [v.numpy().copy() for v in [*target.variables, *target.optimizer.variables]]
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        load_checkpoint(path, target, target.optimizer)
    assert "\n" not in str(raised.value)
    after = [v.numpy() for v in [*target.variables, *target.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
