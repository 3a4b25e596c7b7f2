"""Sampling from the prior: the compiled loop that sample_codes runs draws from the full model's
distributions, is compiled once, and honours temperature, top-k and top-p; bad options fail clearly."""

import ast
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import vq_vae_keras as vqk
from vq_vae_keras.priors import attention
from vq_vae_keras.errors import UsageError
from vq_vae_keras.priors import build_prior
from vq_vae_keras.priors.sampling import draw, sample_codes
from vq_vae_keras.priors.tokens import codes_to_tokens

from conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def prior():
    keras.utils.set_random_seed(0)
    config = tiny_config(img_dim=24)  # a 6x6 grid: 36 positions
    return config, build_prior(config)


@pytest.fixture
def short_segments(monkeypatch):
    """Segments of 12 positions (36 -> 3 segments): the caches grow between the loops."""
    monkeypatch.setattr(attention, "MIN_SEGMENT", 12)
    monkeypatch.setattr(attention, "SEGMENTS", 4)


def nucleus(p, top_p):
    """NumPy: boolean mask of the fewest likeliest codes of p (K,) whose total reaches top_p (ties kept)."""
    ranked = np.sort(p)[::-1]
    kept = int(np.sum(np.cumsum(ranked) - ranked < top_p))
    return p >= ranked[kept - 1]


def restricted_logits(logits, temperature, top_k, top_p):
    """NumPy: logits / T with the codes outside the top-k and then the nucleus set to -inf."""
    logits = logits / temperature
    keep = logits >= np.sort(logits)[::-1][top_k - 1]
    p = np.where(keep, np.exp(logits - logits.max()), 0)
    keep &= nucleus(p / p.sum(), top_p)
    return np.where(keep, logits, -np.inf)


def numpy_noise(seed, sample, position, num_codes):
    """The sampler's uniforms for one sample at one position, from the spec in sampling.noise,
    in NumPy's uint32 arithmetic and float32 (MurmurHash3's finaliser written out here)."""
    def mix(h):  # on uint32 arrays, whose products wrap modulo 2**32
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    a = np.array([0x9E3779B9], np.uint32)
    for word in (seed % 2**32, sample, position):
        a = mix(a ^ np.uint32(word))
    b = mix(np.array([0x7F4A7C15], np.uint32) ^ np.uint32(seed >> 32))
    h = mix(mix(a ^ np.arange(num_codes, dtype=np.uint32)) + b)
    return (((h >> np.uint32(9)).astype(np.float64) + 0.5) / 2**23).astype(np.float32)


def assert_replayed(model, codes, seed, temperature=1.0, top_k=8, top_p=1.0):
    """Each code drawn is the Gumbel-max draw that the FULL model's logits (teacher forced on the
    drawn prefix, restricted in NumPy) give with the sampler's noise (NumPy's, from its spec)."""
    n, length = len(codes), codes[0].size
    probs = model.predict(codes_to_tokens(codes)[:, :-1], verbose=0).astype(np.float64)
    margins = []
    for j in range(n):
        for i in range(length):
            uniform = numpy_noise(seed, j, i, probs.shape[-1])
            scores = restricted_logits(np.log(probs[j, i]), temperature, top_k, top_p) - np.log(-np.log(uniform))
            best = np.sort(scores)[::-1]
            if best[0] - best[1] > 1e-4:  # not a near-tie that float rounding may flip
                margins.append(int(np.argmax(scores) == codes[j].flat[i]))
    assert len(margins) > 0.95 * n * length and all(margins)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.6, top_k=5), dict(top_p=0.7, temperature=1.3)])
def test_the_compiled_loop_draws_from_the_full_model(prior, short_segments, options):
    """Each code sample_codes draws is the Gumbel-max draw that the full model's logits give with
    the same noise: so the cached, compiled loop has the full model's distributions at every
    position, not only their argmax."""
    config, model = prior
    codes = sample_codes(model, 4, config.grid_shape, seed=11, batch_size=2, **options)
    assert_replayed(model, codes, 11, **options)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_the_noise_is_its_spec_in_numpy_eager_and_compiled(seed):
    """sampling.noise, eager and under XLA (as the samplers run it), against its spec written
    out in NumPy: every row a sample (from the batch's first), every column a code."""
    from vq_vae_keras.priors.sampling import noise

    first, rows, num_codes, position = 5, 3, 70, 33
    expected = np.stack([numpy_noise(seed, first + r, position, num_codes) for r in range(rows)])
    args = (tf.constant([seed, first], tf.int64), tf.constant(position), rows, num_codes)
    eager = noise(*args).numpy()
    compiled = tf.function(lambda s, p: noise(s, p, rows, num_codes), jit_compile=True)(*args[:2]).numpy()
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(compiled, expected)
    # The JAX and PyTorch samplers' NumPy noise: the same spec.
    from vq_vae_keras.priors.sampling import noise_numpy

    np.testing.assert_array_equal(noise_numpy((seed, first), position, rows, num_codes), expected)


@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=70, top_p=1.0), dict(temperature=0.6, top_k=5, top_p=1.0),
                                     dict(temperature=1.3, top_k=70, top_p=0.7), dict(temperature=0.9, top_k=9, top_p=0.5)])
def test_the_numpy_draw_of_the_other_backends_is_tensorflows(options):
    """draw_numpy (the JAX and PyTorch samplers') picks the code `draw` picks, compiled as the
    TensorFlow sampler runs it, for the same logits, options, seed and position: tied logits too."""
    from vq_vae_keras.priors.sampling import draw, draw_numpy

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (64, 70)).astype(np.float32)
    logits[:8, :3] = logits[:8, :1]  # ties at the top
    compiled = tf.function(lambda lg, s, p: draw(lg, options["temperature"], options["top_k"], options["top_p"], s, p),
                           jit_compile=True)
    for seed, position in [((0, 0), 0), ((2**40 + 3, 17), 255), ((7, 1000), 5)]:
        expected = compiled(tf.constant(logits), tf.constant(seed, tf.int64), tf.constant(position)).numpy()
        got = draw_numpy(logits, options["temperature"], options["top_k"], options["top_p"], seed, position)
        assert np.mean(got == expected) >= 63 / 64  # a near-tie may round either way


def test_the_noise_never_reaches_0_or_1():
    """log(-log(u)) must be finite for every hash value: the extremes of the uint32 -> (0, 1) map
    (with 24 bits, 2**32 - 1 rounded to 1.0 in float32: an infinite Gumbel score)."""
    from vq_vae_keras.priors.sampling import unit_interval

    u = unit_interval(tf.constant([0, 1, 2**31, 2**32 - 512, 2**32 - 1], tf.uint32)).numpy()
    assert u.dtype == np.float32 and (u > 0).all() and (u < 1).all()
    assert np.isfinite(np.log(-np.log(u))).all()


def test_seeds_up_to_2_63_do_not_fold_onto_32_bits():
    """The seed's two halves go to separate lanes, so two seeds differing in either half draw other
    noise at every code. (Mixed through one 32-bit state, 0 and 5566720164 drew the same noise.)"""
    from vq_vae_keras.priors.sampling import noise

    def draws(seed):
        return np.stack([noise(tf.constant([seed, 0], tf.int64), p, 8, 16).numpy() for p in (0, 1)])

    for a, b in [(0, 5566720164), (5, 2**32 + 5), (2**40 + 5, 2**40 + 6), (2**62, 0)]:
        assert (draws(a) != draws(b)).all(), (a, b)


def test_the_noise_is_uniform_and_its_draws_independent():
    """Across samples, positions and codes: the mean and variance of U(0, 1), no correlation
    between neighbouring codes, samples or positions, and no two (sample, position) rows alike."""
    from vq_vae_keras.priors.sampling import noise

    u = np.stack([noise(tf.constant([3, 0], tf.int64), p, 200, 64).numpy() for p in range(50)])  # (50, 200, 64)
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    for axis in range(3):
        a, b = np.moveaxis(u, axis, 0)[:-1].ravel(), np.moveaxis(u, axis, 0)[1:].ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.01, axis
    assert len({row.tobytes() for row in u.reshape(-1, 64)}) == 50 * 200


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_a_seed_gives_the_same_codes_whatever_the_batch_size(prior, options):
    """Each sample's noise depends on its index in the draw, not on its batch: one sample per
    batch (a CPU's default for long maps), uneven batches, all at once (a GPU's default)."""
    config, model = prior
    codes = [sample_codes(model, 5, config.grid_shape, seed=9, batch_size=b, **options) for b in (1, 2, 5)]
    np.testing.assert_array_equal(codes[0], codes[1])
    np.testing.assert_array_equal(codes[0], codes[2])
    assert (sample_codes(model, 5, config.grid_shape, seed=10, batch_size=5, **options) != codes[0]).mean() > 0.3


def test_greedy_equals_the_full_model_argmax_on_several_grids(short_segments):
    for img_dim, seed in [(16, 0), (28, 2)]:  # 4x4 and 7x7 grids: 2 and 4 segments
        keras.utils.set_random_seed(seed)
        config = tiny_config(img_dim=img_dim)
        model = build_prior(config)
        greedy = sample_codes(model, 3, config.grid_shape, top_k=1, seed=seed)
        probs = model.predict(codes_to_tokens(greedy)[:, :-1], verbose=0)
        np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(3, -1))


def test_the_cached_sampler_sees_new_weights(short_segments):
    """As in training, where each epoch samples from the same prior with updated weights: the
    compiled loop must read the current weights, not those of its first call."""
    keras.utils.set_random_seed(4)
    config = tiny_config(img_dim=20)
    model = build_prior(config)
    sample_codes(model, 2, config.grid_shape, top_k=1, seed=0)
    traces = model.sampler().tracing_count()
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.5, w.shape).astype(w.dtype) for w in model.get_weights()])
    greedy = sample_codes(model, 2, config.grid_shape, top_k=1, seed=0)
    probs = model.predict(codes_to_tokens(greedy)[:, :-1], verbose=0)
    np.testing.assert_array_equal(probs.argmax(-1), greedy.reshape(2, -1))
    assert model.sampler().tracing_count() == traces


def test_the_sampler_is_compiled_once_per_prior_and_batch(prior, short_segments):
    """Count the traces of the function sample_codes really runs: one on the first call (all the
    segments' loops in one function), none on later calls with other seeds, temperature, top-k or
    top-p."""
    config, _ = prior
    model = build_prior(config)  # a fresh prior: nothing compiled yet
    traced = model.sampler().tracing_count
    assert traced() == 0
    sample_codes(model, 3, config.grid_shape, seed=1, batch_size=2)
    first = traced()
    assert first == 1 and len(attention.segments(36)) == 3
    for options in [dict(seed=2), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.8), dict(top_k=2, top_p=0.3)]:
        sample_codes(model, 3, config.grid_shape, batch_size=2, **options)
    sample_codes(model, 2, config.grid_shape, batch_size=2, seed=5)  # another n, same batch
    assert traced() == first
    assert model.sampler() is model.sampler()


def loop_body_copies(hlo):
    """The f32 arrays of rank >= 3 that an optimized HLO module copies inside while-loop bodies."""
    bodies, copies, current = set(re.findall(r"body=%?([\w.\-]+)", hlo)), [], None
    for line in hlo.splitlines():
        header = re.match(r"^%?([\w.\-]+) \(.*\{$", line)
        if header or line.startswith("}"):
            current = header.group(1) if header else None
        elif current in bodies:
            copies += re.findall(r"= (f32\[\d+(?:,\d+){2,}\])\S* copy\(", line)
    return bodies, copies


@pytest.mark.parametrize("batch", [1, 3])
def test_the_compiled_loop_updates_the_caches_in_place(prior, short_segments, batch):
    """XLA's optimized CPU program for the function sample_codes runs: its segment loops copy no
    cache (each copy of a cache at every position read and wrote the whole cache; the layout of
    the caches decides whether XLA can write in place). A check on the program, not a timing."""
    config, _ = prior
    fresh = build_prior(config)  # traced here, with 3 segments; kept alive: its sampler holds it weakly
    sampler = fresh.sampler()
    args = (tf.zeros((batch,), tf.int32), tf.constant([0, 0], tf.int64), tf.constant(1.0), tf.constant(8),
            tf.constant(1.0))
    hlo = sampler.function.experimental_get_compiler_ir(*args)(stage="optimized_hlo", platform_name="CPU")
    bodies, copies = loop_body_copies(hlo)
    assert len(bodies) >= len(attention.segments(36)) == 3
    assert copies == []


def test_the_cpu_batch_size_keeps_long_maps_to_one_sample():
    """Maps of 256+ positions: one sample per batch (any n, any core count); shorter maps: 16, the
    same on every CPU, so that a seed gives the same codes there."""
    small, large = (build_prior(tiny_config(img_dim=img_dim)) for img_dim in (32, 64))  # 8x8, 16x16
    assert large.sampler().cpu_batch_size == 1
    assert small.sampler().cpu_batch_size == 16


def test_one_program_serves_every_seed_and_option(prior):
    """Seeds, temperature, top-k and top-p are runtime arguments of the compiled function, not
    compile-time constants that XLA would fold in and compile again for each value (tracing once
    does not show that: the PixelCNN's row did exactly this)."""
    config, model = prior
    function = model.sampler().function
    programs = [function.experimental_get_compiler_ir(
        tf.zeros((2,), tf.int32), tf.constant(seed, tf.int64), tf.constant(temperature), tf.constant(top_k),
        tf.constant(top_p))(stage="hlo") for seed, temperature, top_k, top_p in [((0, 0), 1.0, 8, 1.0),
                                                                                 ((5, 72), 0.5, 3, 0.7)]]
    assert re.sub(r"HloModule \S+", "", programs[0]) == re.sub(r"HloModule \S+", "", programs[1])


def test_sampling_is_reproducible_with_a_seed(prior):
    config, model = prior
    # batch_size 2: three batches on parallel threads, the last padded
    a = sample_codes(model, 5, config.grid_shape, seed=7, batch_size=2)
    b = sample_codes(model, 5, config.grid_shape, seed=7, batch_size=2)
    c = sample_codes(model, 5, config.grid_shape, seed=8, batch_size=2)
    assert a.shape == (5, 6, 6) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < config.num_codes
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_draw_follows_the_tempered_softmax_top_k_and_top_p():
    """Gumbel-max draws: frequencies match softmax(logits / T); top-k keeps the k best; top-p the
    nucleus; P = 1 is plain sampling."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(np.array([p] * 20000, np.float32))

    def frequencies(temperature=1.0, top_k=4, top_p=1.0, seed=(3, 0)):
        codes = draw(logits, temperature, top_k, top_p, list(seed)).numpy()
        return np.bincount(codes, minlength=4) / len(codes)

    for temperature in (1.0, 0.5):
        tempered = p ** (1 / temperature)
        np.testing.assert_allclose(frequencies(temperature), tempered / tempered.sum(), atol=0.012)
    two = [0.625, 0.375, 0, 0]
    np.testing.assert_allclose(frequencies(top_k=2), two, atol=0.012)
    np.testing.assert_allclose(frequencies(top_p=0.7), two, atol=0.012)
    np.testing.assert_allclose(frequencies(top_p=0.79), two, atol=0.012)
    np.testing.assert_allclose(frequencies(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.012)
    np.testing.assert_allclose(frequencies(top_p=0.9, top_k=1), [1, 0, 0, 0])
    np.testing.assert_allclose(frequencies(top_p=0.3, temperature=0.01), [1, 0, 0, 0])
    np.testing.assert_array_equal(draw(logits, 1.0, 4, 1.0, [5, 5]), draw(logits, 1.0, 4, 0.999999, [5, 5]))


def test_top_p_never_draws_outside_the_nucleus_and_p_1_is_plain_sampling(prior):
    config, model = prior
    codes = sample_codes(model, 6, config.grid_shape, top_p=0.5, seed=3)
    probs = model.predict(codes_to_tokens(codes)[:, :-1], verbose=0).astype(np.float64)
    flat = codes.reshape(6, -1)
    for j in range(6):
        for i in range(36):
            assert nucleus(probs[j, i] / probs[j, i].sum(), 0.5 - 1e-5)[flat[j, i]], (j, i)
    # P = 1: the plain Gumbel-max draw from the full softmax (no code cut), not merely what
    # top_p=None gives (that becomes 1.0 before the sampler); codes outside the 0.5 nucleus come up.
    plain = sample_codes(model, 6, config.grid_shape, top_p=1.0, seed=3, batch_size=3)
    assert_replayed(model, plain, 3)
    probs = model.predict(codes_to_tokens(plain)[:, :-1], verbose=0).astype(np.float64)
    outside = [not nucleus(probs[j, i] / probs[j, i].sum(), 0.5)[plain[j].flat[i]] for j in range(6) for i in range(36)]
    assert sum(outside) > 20


def test_top_k_never_draws_outside_the_k_best(prior):
    config, model = prior
    codes = sample_codes(model, 6, config.grid_shape, top_k=2, seed=3)
    probs = model.predict(codes_to_tokens(codes)[:, :-1], verbose=0)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    assert (top2 == codes.reshape(6, -1, 1)).any(-1).all()


BAD_OPTIONS = {
    "n 0": dict(n=0), "n float": dict(n=2.5), "n bool": dict(n=True),
    "temperature 0": dict(temperature=0), "temperature negative": dict(temperature=-1.0),
    "temperature nan": dict(temperature=float("nan")), "temperature inf": dict(temperature=float("inf")),
    "temperature text": dict(temperature="1"),
    "top_k 0": dict(top_k=0), "top_k too big": dict(top_k=9), "top_k float": dict(top_k=2.0),
    "top_p 0": dict(top_p=0.0), "top_p above 1": dict(top_p=1.5), "top_p negative": dict(top_p=-0.1),
    "top_p nan": dict(top_p=float("nan")), "top_p inf": dict(top_p=float("inf")),
    "grid mismatch": dict(grid_shape=(5, 5)),
    "seed nan": dict(seed=float("nan")), "seed float": dict(seed=1.5), "seed negative": dict(seed=-1),
    "seed text": dict(seed="3"), "seed bool": dict(seed=True),
    "batch_size 0": dict(batch_size=0), "batch_size float": dict(batch_size=2.0),
    "temperature bool": dict(temperature=True), "top_p bool": dict(top_p=True),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_sampling_options(prior, case):
    config, model = prior
    args = {"n": 1, "grid_shape": config.grid_shape, **BAD_OPTIONS[case]}
    with pytest.raises(UsageError) as error:
        sample_codes(model, args.pop("n"), args.pop("grid_shape"), **args)
    name = case.split()[0]
    assert name in str(error.value) and "\n" not in str(error.value)


def test_sampling_needs_a_prior_from_build_prior(prior):
    config, model = prior
    plain = keras.Model(model.input, model.output)
    with pytest.raises(UsageError, match="build_prior"):
        sample_codes(plain, 1, config.grid_shape)


def test_sampling_from_many_priors_does_not_warn_of_retracing(retracing_warnings):
    """Every attention prior's sampler traces the same Python function (CachedSampler.compiled),
    so a process that samples from six priors (a two-level run's two, three runs...) got
    TensorFlow's "excessive retracing" warning although each traced once; sample_codes keeps it
    out, and calling the samplers as they are still gets it (so the check can fire)."""
    priors = [vqk.build_prior(tiny_config(seed=seed)) for seed in range(7)]
    for prior in priors:
        prior.sampler().sample(1, (0, 0), 1.0, 8, 1.0)
    assert retracing_warnings() > 0
    priors = [vqk.build_prior(tiny_config(seed=seed)) for seed in range(7)]
    for prior in priors:
        sample_codes(prior, 1, (4, 4), seed=0)
    assert retracing_warnings() == 0


def test_each_module_of_the_priors_imports_only_the_ones_before_it():
    """tokens, sampling, condition, attention, pixelcnn, then the package's build_prior: no cycle,
    and sample_codes knows no prior kind (each prior hands out its own sampler)."""
    order = ["tokens", "sampling", "condition", "attention", "pixelcnn", "__init__"]
    folder = os.path.dirname(attention.__file__)
    for i, name in enumerate(order):
        with open(os.path.join(folder, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x
                imported |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        assert imported <= set(order[:i]), f"priors/{name}.py imports {sorted(imported - set(order[:i]))}"


def test_cli_top_p(trained_run, tmp_path):
    run = trained_run["run"]
    codes = str(tmp_path / "codes.npy")
    run_cli("sample.py", "random", "--run", run, "--n", "2", "--top-p", "0.5", "--seed", "1", "--codes-out", codes,
            "--out", str(tmp_path / "random.png"))
    assert np.load(codes).shape[0] == 4  # bad values of --top-p: rows of tests/test_bad_inputs.py
    assert vqk.sample_codes is sample_codes


def test_a_sampler_whose_prior_is_gone_says_so(prior):
    """A sampler holds its prior weakly (it never keeps one alive); once the prior is collected,
    using the sampler is a clear error, not an AttributeError on None deep in the trace."""
    import gc

    config, _ = prior
    fresh = build_prior(config)
    sampler = fresh.sampler()
    del fresh
    gc.collect()
    with pytest.raises(ReferenceError, match="prior no longer exists"):
        sampler.model
