"""Prior sampling speed: cached sampler vs the reference's full-prefix recompute, same weights.

    python bench/sample_speed.py [--ref-grid 16] [--ref-n 16] [--n 64] [--ref-stride 32]

Prints, from one run (every figure a ratio of times measured in this run):
  1. both methods, in full, on the same small grid (--ref-n samples), and their ratio; the
     sampler's time per position (all samples) against two figures measured in the same run: the
     same matmuls as one position of all the samples (q/k/v, attention over the mean prefix,
     Dense, output layer) run alone as one batch of plain batched matmuls in an XLA loop (the
     issue's "compute bound"; one batch, not the sampler's layout, so the sampler can beat it);
     and a true lower bound, their arithmetic at this machine's 1024x1024 matmul rate;
  2. both at the reference size (--n samples, 32x32 grid, 128 px config): the cached sampler's
     first call (compilation included) and second call; the reference's loop (one predict call on
     the whole prefix per position, about 25 min in full on 2 cores) timed at every
     --ref-stride-th position and scaled by the stride;
  3. the peak memory of one prior training step at the reference size (sequence 1024, batch 32),
     measured in a child process.

    python bench/sample_speed.py --processes 3 [--run RUN]

times only what a user waits for, whole `sample.py random --n 8` processes (64 samples) on a
reference-size run (32x32 code map, the default prior; --run, else one trained a step in a
temporary folder): per round, the run's XLA cache removed, a first process (compiles, writes the
cache) then a second (loads it); the median of each and their ratio.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from vq_vae_keras.priors.sampling import default_batch_size  # noqa: E402
from vq_vae_keras.priors.tokens import codes_to_tokens  # noqa: E402
from vq_vae_keras.rundir import RunDir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_sample(prior, n, grid_shape, seed=0, stride=1):
    """The reference's random_sample_code: rerun the whole prefix for each position.

    With stride > 1 only every stride-th position is computed (the others keep their tokens) and
    the time is scaled by the stride: a systematic sample of the loop's cost, which grows with i.
    Returns the (estimated) seconds for the whole loop.
    """
    h, w = grid_shape
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, h * w + 1), np.int32)
    start = time.perf_counter()
    for i in range(stride // 2, h * w, stride):
        p = prior.predict(tokens[:, :i + 1], verbose=0)[:, -1].astype(np.float64)
        for j in range(n):
            tokens[j, i + 1] = rng.choice(p.shape[-1], p=p[j] / p[j].sum()) + 1
    return (time.perf_counter() - start) * stride


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compute_bound(prior, batch, reps=64):
    """Seconds per position of the sampler's matmuls alone, for a batch: every block's fused
    q/k/v projection, q.k and p.v over the mean prefix (h*w / 2 keys) and its Dense layer, then
    the output layer; plain batched matmuls in one XLA loop (random weights of the same shapes)."""
    rng = np.random.default_rng(0)
    heads, head_dim, dim, depth = prior.heads, prior.head_dim, prior.dim, prior.depth
    prefix = prior.height * prior.width // 2
    normal = lambda *shape: tf.constant(0.05 * rng.standard_normal(shape), tf.float32)  # noqa: E731
    weights = [(normal(dim, 3 * heads * head_dim), normal(heads * head_dim, dim),
                normal(batch, heads, prefix, head_dim), normal(batch, heads, prefix, head_dim)) for _ in range(depth)]
    output = normal(dim, prior.num_codes)

    @tf.function(jit_compile=True)
    def run(x, weights, output):
        def body(i, x):
            for qkv, dense, keys, values in weights:
                q, k, v = tf.split(x @ qkv, 3, axis=-1)  # all three used, so none is optimised away
                q = tf.reshape(q + k + v, (batch, heads, 1, head_dim))
                a = tf.matmul(tf.matmul(q, keys, transpose_b=True), values)
                x = tf.reshape(a, (batch, heads * head_dim)) @ dense
            return i + 1, x + tf.reduce_mean(x @ output)  # keeps the output layer live
        return tf.while_loop(lambda i, x: i < reps, body, (0, x))[1]

    x = normal(batch, dim)
    run(x, weights, output).numpy()  # compile
    return min(timed(lambda: run(x, weights, output).numpy()) for _ in range(3)) / reps


def position_flops(prior, batch):
    """Multiply-adds x 2 of one position for a batch: q/k/v, attention over the mean prefix,
    Dense, output layer."""
    inner, prefix = prior.heads * prior.head_dim, prior.height * prior.width / 2
    block = 3 * prior.dim * inner + 2 * prefix * inner + inner * prior.dim
    return 2 * batch * (prior.depth * block + prior.dim * prior.num_codes)


def matmul_peak(size=1024, reps=8):
    """Floating-point operations per second of a large float32 matmul in XLA, both cores."""
    a = tf.random.normal((size, size))
    square = tf.function(lambda a: tf.reduce_sum(tf.foldl(lambda x, _: x @ a / size, tf.range(reps), a)),
                         jit_compile=True)
    square(a).numpy()
    return 2 * size ** 3 * reps / min(timed(lambda: square(a).numpy()) for _ in range(3))


def memory_child():
    config = vqk.Config()  # 128 px: 32x32 grid, sequence 1024
    prior = vqk.build_prior(config)
    prior.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    tokens = codes_to_tokens(np.random.default_rng(0).integers(0, 64, (32, 32, 32)))
    prior.train_on_batch(tokens[:, :-1], tokens[:, 1:] - 1)
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")


def reference_run(folder):
    """A run at the reference size (128 px: a 32x32 code map, the default prior), each stage
    trained one step on random images: sampling's cost does not depend on the weights."""
    images = np.random.default_rng(0).uniform(-1, 1, (4, 128, 128, 3)).astype("float32")
    config = vqk.Config(batch_size=4, prior_batch_size=4, sample_every_epochs=0)
    vqk.train_vqvae(config, folder, steps=1, data=images)
    vqk.train_prior(config, folder, steps=1, data=images)
    return folder


def process_rounds(run, rounds):
    """Medians of the wall time of a first and a second `sample.py random --n 8` process, the
    run's XLA cache removed before each first one (rounds interleaved)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VQK_XLA_CACHE", "TF_XLA_FLAGS")}
    command = [sys.executable, os.path.join(ROOT, "sample.py"), "random", "--run", run, "--n", "8", "--seed", "0",
               "--out", os.path.join(tempfile.mkdtemp(), "random.png")]
    def cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    first, second = [], []  # (wall, CPU) seconds of each process
    for round_ in range(rounds):
        shutil.rmtree(RunDir(run).xla_cache, ignore_errors=True)
        for times in (first, second):
            start = cpu()
            wall = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))
            times.append((wall, cpu() - start))
        print(f"  round {round_ + 1}: first {first[-1][0]:.1f} s ({first[-1][1]:.1f} s CPU), "
              f"second {second[-1][0]:.1f} s ({second[-1][1]:.1f} s CPU)")
    first, second = np.median(first, axis=0), np.median(second, axis=0)
    print(f"sample.py random --n 8 (64 samples, 32x32 code map), whole processes, medians of {rounds}: "
          f"first {first[0]:.1f} s, second {second[0]:.1f} s: {first[0] / second[0]:.2f}x "
          f"(CPU time {first[1]:.1f} s vs {second[1]:.1f} s: {first[1] / second[1]:.2f}x)")


def main():
    warnings.filterwarnings("ignore", message=".*softmax over axis.*")  # the 1-token prefix: harmless
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-grid", type=int, default=16, help="side of the grid for the head-to-head (default 16)")
    parser.add_argument("--ref-n", type=int, default=16, help="samples on the small grid (default 16)")
    parser.add_argument("--n", type=int, default=64, help="samples at the reference size (default 64)")
    parser.add_argument("--ref-stride", type=int, default=32,
                        help="at 32x32, time the reference at every this-many positions (default 32)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the reference's loop at 32x32 (about 20 min) and the memory measure")
    parser.add_argument("--processes", type=int, metavar="ROUNDS",
                        help="only time ROUNDS pairs of sample.py processes (first, second) at the reference size")
    parser.add_argument("--run", help="with --processes: the run to sample (default: one built in a temporary folder)")
    args = parser.parse_args()

    if args.processes:
        with tempfile.TemporaryDirectory() as folder:
            return process_rounds(args.run or reference_run(os.path.join(folder, "run")), args.processes)
    keras.utils.set_random_seed(0)
    config = vqk.Config()
    small, n = (args.ref_grid, args.ref_grid), args.ref_n
    positions = small[0] * small[1]
    # The reference prior (dim 256, 8 heads x 32, 4 blocks), random weights, for the small grid.
    prior = vqk.build_prior(vqk.Config(img_dim=4 * args.ref_grid))
    first_small = timed(lambda: vqk.sample_codes(prior, n, small, seed=0))  # warm-up: compiles once
    reference_sample(prior, n, (1, 2))  # warm-up predict
    # Interleaved: sampler, bound, reference, sampler, bound; the best of each.
    cached, bound = [], []
    for round_ in range(2):
        cached.append(timed(lambda: vqk.sample_codes(prior, n, small, seed=1 + round_)))
        bound.append(compute_bound(prior, n))
        if round_ == 0:
            reference_small = reference_sample(prior, n, small)
    cached_small, bound = min(cached), min(bound)
    per_position, arithmetic = cached_small / positions, position_flops(prior, n) / matmul_peak()
    print(f"{n} samples on a {small[0]}x{small[1]} grid ({positions} positions), same weights:")
    print(f"  reference full recompute: {reference_small:8.2f} s")
    print(f"  cached sampler:           {cached_small:8.2f} s")
    print(f"  speed-up:                 {reference_small / cached_small:8.1f}x")
    print(f"  cached sampler, 1st call: {first_small:8.2f} s (compilation included)")
    batch = default_batch_size(prior.sampler(), n)
    gpu = bool(tf.config.list_logical_devices("GPU"))
    print(f"  sampler layout: batches of {batch} on {'the GPU' if gpu else f'{os.cpu_count()} threads'}")
    print(f"  sampler per position ({n} samples): {per_position * 1e3:.2f} ms = {per_position / bound:.2f}x its "
          f"matmuls run alone as one batch ({bound * 1e3:.2f} ms), {per_position / arithmetic:.1f}x the lower bound "
          f"of their arithmetic at the matmul peak ({arithmetic * 1e3:.2f} ms)")

    full_prior = vqk.build_prior(config)
    cold = timed(lambda: vqk.sample_codes(full_prior, args.n, config.grid_shape, seed=2))
    cached_full = timed(lambda: vqk.sample_codes(full_prior, args.n, config.grid_shape, seed=3))
    print(f"\n{args.n} samples at the reference size (32x32 grid, 128 px config), same weights:")
    if not args.quick:
        reference_full = reference_sample(full_prior, args.n, config.grid_shape, stride=args.ref_stride)
        print(f"  reference full recompute: {reference_full:8.0f} s (every {args.ref_stride}th position timed, "
              f"x{args.ref_stride})")
    print(f"  cached sampler, 1st call: {cold:8.2f} s (compilation included)")
    print(f"  cached sampler, 2nd call: {cached_full:8.2f} s ({cold / cached_full:.1f}x faster: no recompile)")
    if args.quick:
        return
    print(f"  speed-up (2nd call):      {reference_full / cached_full:8.0f}x")

    out = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True)
    peak = float(out.stdout.split()[-1])
    print(f"\none prior training step at sequence 1024, batch 32: peak RSS {peak:.2f} GiB (whole process)")


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        memory_child()
    else:
        main()
