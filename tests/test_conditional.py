"""Class-conditional priors: the class reaches the attention prior through its start token, the
compiled sampler honours it, and end to end (folders of reddish and bluish images, both prior
kinds) samples of a class are closer to that class; names round trip through config.json."""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

import vq_vae_keras as vqk
from vq_vae_keras.priors.sampling import sample_codes
from vq_vae_keras.priors.tokens import class_tokens, codes_to_tokens

from conftest import TINY_FLAGS, run_cli, tiny_config


def test_attention_prior_takes_the_class_at_its_start_token():
    keras.utils.set_random_seed(0)
    config = tiny_config(classes=["cat", "dog"])
    model = vqk.build_prior(config)
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    assert "class_embedding" in [layer.name for layer in model.layers]
    assert "class_embedding" not in [layer.name for layer in vqk.build_prior(tiny_config()).layers]  # reference layout
    codes = rng.integers(0, 8, (1, 4, 4))
    cat, dog, none = (model.predict(codes_to_tokens(codes, start)[:, :-1], verbose=0)[0]
                      for start in (class_tokens([0], 8), class_tokens([1], 8), 0))
    assert (np.abs(cat - dog).max(-1) > 1e-4).all()  # every position hears the class
    assert np.abs(none - cat).max() > 1e-4  # token 0 stays the class-free start
    greedy = sample_codes(model, 3, config.grid_shape, top_k=1, seed=0, classes=["dog", "cat", "dog"])
    probs = model.predict(codes_to_tokens(greedy, class_tokens([1, 0, 1], 8))[:, :-1], verbose=0)
    np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(3, -1))
    default = sample_codes(model, 4, config.grid_shape, top_k=1, seed=0)  # no classes: each in turn, in blocks
    np.testing.assert_array_equal(default[0], greedy[1])
    np.testing.assert_array_equal(default[3], greedy[0])
    with pytest.raises(vqk.UsageError, match="not class-conditional"):
        sample_codes(vqk.build_prior(tiny_config()), 1, config.grid_shape, classes="cat")
    with pytest.raises(vqk.UsageError, match="one class or a list of 3"):
        sample_codes(model, 3, config.grid_shape, classes=["cat", "dog"])


def write_tinted(folder, hue, count, seed):
    """count 16 px images dominated by one channel (0 red, 2 blue), with random smooth texture."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = rng.uniform(0, 60, (4, 4, 3))
        img[..., hue] = rng.uniform(180, 255, (4, 4))
        big = np.kron(img, np.ones((4, 4, 1))).astype(np.uint8)
        Image.fromarray(big).save(os.path.join(folder, f"img_{i:02d}.png"))


def histogram(codes, num_codes=8):
    return np.bincount(np.asarray(codes).ravel(), minlength=num_codes) / np.asarray(codes).size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["attention", "pixelcnn"])
def test_conditional_samples_are_closer_to_their_own_class(tmp_path, kind):
    data = tmp_path / "data"
    write_tinted(data / "red", 0, 12, seed=1)
    write_tinted(data / "blue", 2, 12, seed=2)
    run = str(tmp_path / "run")
    run_cli("train.py", "vqvae", "--data", str(data), "--run", run, *TINY_FLAGS, "--steps", "4", "--sample-every", "4")
    config = vqk.Config.load(os.path.join(run, "config.json"))
    config.prior_heads, config.prior_head_dim, config.prior_depth = 2, 4, 2  # tests only: a small attention prior
    config.save(os.path.join(run, "config.json"))
    size = ["--pixelcnn-width", "16", "--pixelcnn-depth", "4", "--pixelcnn-kernel", "3"] if kind == "pixelcnn" else []
    run_cli("train.py", "prior", "--run", run, "--prior", kind, *size, "--classes", "--steps", "80", "--batch-size", "8",
            "--sample-every-epochs", "0")

    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["classes"] == ["blue", "red"] and saved["prior"] == kind
    codes, labels = np.load(os.path.join(run, "codes.npy")), np.load(os.path.join(run, "labels.npy"))
    np.testing.assert_array_equal(labels, [0] * 12 + [1] * 12)  # sorted folders: blue first
    blue, red = histogram(codes[labels == 0]), histogram(codes[labels == 1])
    assert np.abs(blue - red).sum() > 0.5, "the VQ-VAE codes both tints alike: the test would prove nothing"

    drawn = {}
    for name in ("red", "blue"):  # a fresh process each: load_run rebuilds the conditional prior from config.json
        out = str(tmp_path / f"{name}.npy")
        run_cli("sample.py", "random", "--run", run, "--n", "4", "--class", name, "--seed", "3", "--codes-out", out,
                "--out", str(tmp_path / f"{name}.png"))
        drawn[name] = histogram(np.load(out))
    for name, own, other in [("red", red, blue), ("blue", blue, red)]:
        assert np.abs(drawn[name] - own).sum() < np.abs(drawn[name] - other).sum(), name

    bad = run_cli("sample.py", "random", "--run", run, "--class", "green", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown class" in bad.stderr
