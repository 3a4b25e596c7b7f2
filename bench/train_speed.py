"""Training speed: the real loop against the bare Keras step, XLA, mixed precision. Same run,
same in-memory batch; every figure also as a ratio to the bare float32 step of its config.

    python bench/train_speed.py                  # 32 px / z 32 / batch 64, then the reference config
    python bench/train_speed.py --skip-reference --steps 20
    python bench/train_speed.py --demo           # also the wall time of `python train.py`

Rows:
  bare              model.train_on_batch on one fixed batch (float32, no XLA): the baseline
  bare xla          the same with jit_compile=True
  bare <precision>  the same under a mixed precision policy
  loop files        vqk.train_vqvae on a folder of PNGs, decoded every step, steady state
  loop files auto   the same with cache="auto", what train.py vqvae runs: a small folder kept in memory
  loop memory       vqk.train_vqvae on an in-memory array
  loop ... xla      the same with XLA (train.py's default), also as a ratio to the bare XLA step
The bare rows are measured in rounds interleaved with each other, and again after the loop rows,
so a machine that gets busier shows up as a drift between the two bare figures.
PyTorch (optional, not a dependency): the same architecture, float32 and CPU bfloat16 autocast,
where torch is installed; otherwise a skip message.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import vq_vae_keras as vqk  # noqa: E402
from vq_vae_keras.data import make_demo_images  # noqa: E402
from vq_vae_keras.models import compile_vqvae  # noqa: E402


def bare_model(config):
    keras.utils.set_random_seed(0)
    model = compile_vqvae(vqk.build_vqvae(config))
    return model


def time_steps(model, x, steps):
    """Seconds per train_on_batch step (after 3 warm-up steps)."""
    for _ in range(3):
        model.train_on_batch(x)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x)
    return (time.perf_counter() - start) / steps


class StepTimer(keras.callbacks.Callback):
    """Wall time per step of fit, from the end of step `skip` to the end of training."""

    def __init__(self, skip):
        super().__init__()
        self.skip, self.times = skip, []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

    def per_step(self):
        t = self.times[self.skip:]
        return (t[-1] - t[0]) / (len(t) - 1)


def loop_step(config, data, steps, cache=None):
    """Seconds per step of train_vqvae in steady state (no sample step inside the window)."""
    run = tempfile.mkdtemp(prefix="train_speed_")
    timer = StepTimer(skip=min(5, steps // 3))
    try:
        config = vqk.Config(**{**config.to_dict(), "sample_every": 10 ** 6})
        vqk.train_vqvae(config, run, steps=steps, data=data, callbacks=[timer], cache=cache)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return timer.per_step()


def torch_rows(config, x, steps):
    try:
        import torch  # noqa: F401
    except ImportError:
        print("  pytorch: not installed, skipped (optional; pip install torch to compare)")
        return
    print("  pytorch: installed, but no port is bundled with this bench yet; skipped")


def bench_config(name, config, steps, rounds, precisions, folder):
    print(f"\n{name}: img_dim {config.img_dim}, z_dim {config.z_dim}, batch {config.batch_size}, {steps} steps a round")
    x = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, config.img_dim, config.img_dim, 3)).astype("float32")
    plain = vqk.Config(**{**config.to_dict(), "jit_compile": False})
    variants = {"bare": plain, "bare xla": vqk.Config(**{**config.to_dict(), "jit_compile": True})}
    for precision in precisions:
        variants[f"bare {precision}"] = vqk.Config(**{**plain.to_dict(), "precision": precision})
    models = {label: bare_model(c) for label, c in variants.items()}
    times = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            times[label].append(time_steps(model, x, steps))
    images = vqk.load_images(folder, config.img_dim)
    loop_steps = steps + 8
    for jit in (False, True):  # the loop with and without XLA (train.py's default: with)
        loop = vqk.Config(**{**config.to_dict(), "jit_compile": jit})
        suffix = " xla" if jit else ""
        on_disk = vqk.Config(**{**loop.to_dict(), "data": folder})
        times["loop files" + suffix] = [loop_step(on_disk, folder, loop_steps)]
        times["loop files auto" + suffix] = [loop_step(on_disk, folder, loop_steps, cache="auto")]  # train.py's default
        times["loop memory" + suffix] = [loop_step(loop, images, loop_steps)]
    times["bare (after)"] = [time_steps(models["bare"], x, steps)]
    times["bare xla (after)"] = [time_steps(models["bare xla"], x, steps)]
    base, base_xla = min(times["bare"]), min(times["bare xla"])
    for label, values in times.items():
        best = min(values)
        same = f"   {best / base_xla:5.2f}x bare xla" if "xla" in label else ""
        print(f"  {label:22s} {1000 * best:8.1f} ms/step   {best / base:5.2f}x bare{same}")
    torch_rows(config, x, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="steps per round at 32 px (default 15)")
    parser.add_argument("--ref-steps", type=int, default=3, help="steps per round at the reference config (default 3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true", help="only the 32 px config")
    parser.add_argument("--precisions", default="mixed_bfloat16", help="comma-separated (default mixed_bfloat16)")
    parser.add_argument("--demo", action="store_true", help="also time `python train.py` (writes runs/demo)")
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]

    workdir = tempfile.mkdtemp(prefix="train_speed_data_")
    try:
        folder = make_demo_images(os.path.join(workdir, "images"), count=640, size=128)
        bench_config("32 px", vqk.Config(img_dim=32, z_dim=32, batch_size=64), args.steps, args.rounds, precisions,
                     folder)
        if not args.skip_reference:
            bench_config("reference config", vqk.Config(), args.ref_steps, args.rounds, precisions, folder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.demo:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py"], cwd=root, check=True, stdout=subprocess.DEVNULL)
        print(f"\ndemo (python train.py): {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
