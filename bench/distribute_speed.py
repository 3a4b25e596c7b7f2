"""Step time: one device against MirroredStrategy over 2 logical CPU devices, the same VQ-VAE step
(32 px, batch 16, no XLA), same process, interleaved rounds, median of 3. The logical devices share
the same cores, so this measures the overhead of replication, not a speed-up.

    python bench/distribute_speed.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vq_vae_keras.distribute import make_strategy  # noqa: E402  (splits the CPU before TensorFlow starts)

strategy = make_strategy("mirrored", cpu_replicas=2)
import numpy as np  # noqa: E402
import vq_vae_keras as vqk  # noqa: E402
from vq_vae_keras.models import compile_vqvae  # noqa: E402
from vq_vae_keras.distribute import strategy_scope  # noqa: E402

config = vqk.Config(img_dim=32, z_dim=64, num_codes=64, batch_size=16, jit_compile=False)
x = np.random.default_rng(0).uniform(-1, 1, (16 * 8, 32, 32, 3)).astype("float32")
models = {}
for name, s in (("one", None), ("mirrored", strategy)):
    with strategy_scope(s):
        models[name] = compile_vqvae(vqk.build_vqvae(config))
    models[name].fit(x[:32], batch_size=16, epochs=1, verbose=0)  # trace
times = {k: [] for k in models}
for _ in range(3):
    for name, model in models.items():
        t = time.perf_counter()
        model.fit(x, batch_size=16, epochs=1, verbose=0)
        times[name].append((time.perf_counter() - t) / 8)
one, mir = np.median(times["one"]), np.median(times["mirrored"])
print(f"step time one device {one*1000:.0f} ms, mirrored 2 CPU replicas {mir*1000:.0f} ms, ratio {mir/one:.2f}")
