"""The same work under each Keras backend installed: TensorFlow (the baseline), JAX, PyTorch.

    python bench/backend_speed.py [--repeats 20] [--config demo|reference]

Each backend runs in a process of its own (KERAS_BACKEND) and times, after a warm-up:
  1. a VQ-VAE training step, fit(x) as train.py runs it (demo: 32 px, z 32, batch 64; reference:
     128 px, z 128, batch 64), the median over --repeats steps;
  2. drawing 16 code maps from an untrained attention prior of the demo's size (8x8 codes), the
     whole sample_codes call (TensorFlow: its XLA-compiled sampler, compiled in the warm-up; JAX:
     a jax.jit program per position, the draw in NumPy; PyTorch: eager), the median of 3.
Prints each figure as a ratio to TensorFlow's, measured in the same run on the same machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"demo": dict(img_dim=32, z_dim=32, num_codes=64, batch_size=64),
           "reference": dict(img_dim=128, z_dim=128, num_codes=64, batch_size=64)}
BACKENDS = ("tensorflow", "jax", "torch")


def measure(config_name, repeats):
    """In the child: (seconds per training step, seconds per 16 samples)."""
    sys.path.insert(0, ROOT)
    import numpy as np

    import vq_vae_keras as vqk
    from vq_vae_keras.models import compile_vqvae

    config = vqk.Config(**CONFIGS[config_name])
    model = compile_vqvae(vqk.build_vqvae(config))
    x = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, config.img_dim, config.img_dim, 3)).astype("float32")
    model.fit(x, batch_size=config.batch_size, epochs=2, verbose=0)  # builds and compiles the step
    steps = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(x, batch_size=config.batch_size, epochs=1, verbose=0)
        steps.append(time.perf_counter() - start)

    prior_config = vqk.Config(img_dim=32, z_dim=32, num_codes=64)  # the demo's prior: 8x8 codes
    prior = vqk.build_prior(prior_config)
    vqk.sample_codes(prior, 16, prior_config.grid_shape, seed=0)  # compiles (TensorFlow)
    draws = []
    for seed in range(3):
        start = time.perf_counter()
        vqk.sample_codes(prior, 16, prior_config.grid_shape, seed=seed)
        draws.append(time.perf_counter() - start)
    return float(np.median(steps)), float(np.median(draws))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--config", choices=CONFIGS, default="demo")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.repeats)))
        return
    results = {}
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend}
        done = subprocess.run([sys.executable, __file__, "--child", backend, "--config", args.config,
                               "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: not measured ({done.stderr.strip().splitlines()[-1]})")
            continue
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    base_step, base_draw = results["tensorflow"]
    print(f"{args.config} config, {args.repeats} steps; ratios to TensorFlow in this run (lower is faster); "
          f"TensorFlow: {base_step * 1000:.0f} ms a step, {base_draw * 1000:.0f} ms for 16 samples")
    print(f"{'backend':<12}{'train step':>12}{'16 samples':>12}")
    for backend, (step, draw) in results.items():
        print(f"{backend:<12}{step / base_step:>11.2f}x{draw / base_draw:>11.2f}x")


if __name__ == "__main__":
    main()
