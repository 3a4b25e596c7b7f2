"""What tests/test_backends.py runs in a fresh process under one Keras backend (KERAS_BACKEND;
a process has one): `python backend_check.py COMMAND SPEC.json`, the results written where the
spec says.

  fit      each config of spec["configs"]: build_vqvae, compile, fit(x) from user code; writes
           each one's logs (json) and the untrained model's outputs on the batch (npz).
  outputs  one config: its VQ-VAE and prior, trained a few steps and saved (spec["train"]) or
           loaded from the weight files the spec names; writes what they compute from fixed
           inputs (npz): codes, reconstructions with and without quantizing, prior probabilities,
           and code maps sampled with fixed seeds.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

import vq_vae_keras as vqk  # noqa: E402
from vq_vae_keras.models import compile_vqvae  # noqa: E402
from vq_vae_keras.priors import compile_prior  # noqa: E402
from vq_vae_keras.priors.tokens import codes_to_tokens  # noqa: E402


def images(n, size, seed=0):
    """Smooth random colour ramps in [-1, 1] (learnable), (n, size, size, 3) float32."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    cols = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :, None]
    a, b, c = rng.uniform(-0.6, 0.6, (3, n, 1, 1, 3)).astype(np.float32)
    return a * (1 - rows) + b * rows + c * cols


def numpy(t):
    """Tensors (or a list of them) -> NumPy, floats as float32 (np.savez cannot write bfloat16)."""
    if isinstance(t, list):
        return [numpy(a) for a in t]
    a = keras.ops.convert_to_numpy(t)
    return a if a.dtype.kind in "iu" else a.astype(np.float32)


def fit(spec):
    """fit(x) on one batch for spec["epochs"] epochs: each epoch's logs are one step's. Beside them
    what the untrained model makes of that batch (encode, quantize, decode), from which the test
    computes what the first step must log, and the weights fit ends with. spec["distribute"]:
    make_strategy's kind first (JAX: DataParallel over the process's devices); spec["sgd"]: plain
    SGD, not the config's Adam."""
    if spec.get("distribute"):
        vqk.make_strategy(spec["distribute"])
    for name, overrides in spec["configs"].items():
        config = vqk.Config(**overrides)
        vqvae = vqk.build_vqvae(config)
        x = images(config.batch_size, config.img_dim)
        # As the training step sees the batch: BatchNorm on its statistics (training=True), the
        # quantizer's choice without its training-time updates (training=False).
        z = numpy(vqvae.encoder(x, training=True))
        quantized = numpy(vqvae.quantizer(z, training=False))
        codes, vectors = (quantized[:2], quantized[2:]) if config.levels == 2 else quantized
        levels = lambda a: a if config.levels == 2 else [a]  # noqa: E731
        arrays = {"x": x, "recon": numpy(vqvae.decoder(vectors, training=True))}
        for i, (zi, ci, ei) in enumerate(zip(levels(z), levels(codes), levels(vectors))):
            arrays.update({f"z{i}": zi, f"codes{i}": ci, f"vectors{i}": ei})
        if spec.get("sgd"):  # plain steps: float noise stays noise (Adam's first step is +-lr for any gradient)
            vqvae.train_model.compile(optimizer=keras.optimizers.SGD(0.05))
        else:
            compile_vqvae(vqvae)
        history = vqvae.train_model.fit(x, batch_size=config.batch_size, epochs=spec["epochs"], shuffle=False, verbose=0)
        weights = {f"weight{i}": numpy(w) for i, w in enumerate(vqvae.train_model.weights)}
        if spec.get("distribute"):  # the devices a weight lives on: all of them under DataParallel
            with open(os.path.join(spec["out"], name + "-devices.json"), "w") as f:
                json.dump(len(vqvae.train_model.weights[0].value.sharding.device_set), f)
        np.savez(os.path.join(spec["out"], name + ".npz"), **arrays, **weights)
        with open(os.path.join(spec["out"], name + ".json"), "w") as f:
            json.dump({key: [float(v) for v in values] for key, values in history.history.items()}, f)


def outputs(spec):
    config = vqk.Config(**spec["config"])
    vqvae, prior = vqk.build_vqvae(config), vqk.build_prior(config)
    x = images(2 * config.batch_size, config.img_dim, seed=1)
    if spec.get("train"):
        compile_vqvae(vqvae).fit(x, batch_size=config.batch_size, epochs=2, verbose=0)
        codes = vqvae.quantize(vqvae.encode(x))[0]
        tokens = codes_to_tokens(codes)
        compile_prior(prior, config).fit(tokens[:, :-1], codes.reshape(len(codes), -1), batch_size=config.batch_size,
                                         epochs=2, verbose=0)
        vqvae.train_model.save_weights(spec["vqvae_weights"])
        prior.save_weights(spec["prior_weights"])
    else:
        vqvae.train_model.load_weights(spec["vqvae_weights"])
        prior.load_weights(spec["prior_weights"])
    codes, vectors = vqvae.quantize(vqvae.encode(x))
    rng = np.random.default_rng(2)  # fixed tokens: every backend scores the same ones
    scored = rng.integers(0, config.num_codes, (4, *config.grid_shape))
    return {"codes": codes, "vectors": vectors, "recon": vqvae.reconstruct(x),
            "recon_unquantized": vqvae.reconstruct(x, quantize=False),
            "probabilities": keras.ops.convert_to_numpy(prior(codes_to_tokens(scored)[:, :-1])),
            "samples": vqk.sample_codes(prior, 4, config.grid_shape, seed=5),
            "samples_top_k": vqk.sample_codes(prior, 4, config.grid_shape, seed=6, top_k=3, temperature=0.8)}


if __name__ == "__main__":
    command, spec_path = sys.argv[1:]
    with open(spec_path) as f:
        spec = json.load(f)
    print("backend:", keras.backend.backend())
    if command == "fit":
        fit(spec)
    else:
        np.savez(spec["out"], **outputs(spec))
