"""Training speed: the real loop against the bare Keras step, XLA, mixed precision. Same run,
same in-memory batch; every figure also as a ratio to the bare float32 step of its config.

    python bench/train_speed.py                  # 32 px / z 32 / batch 64, then the reference config
    python bench/train_speed.py --skip-reference --steps 20
    python bench/train_speed.py --skip-small --bare-only --rounds 1 --ref-steps 2   # 128 px, bare and PyTorch rows
    python bench/train_speed.py --skip-reference --bare-only --z-dim 128            # the PyTorch target's config
    python bench/train_speed.py --demo           # also the wall time of `python train.py`, normalised
    python bench/train_speed.py --memory --skip-small --skip-reference   # only the memory rows (128 px)
    python bench/train_speed.py --train-py --rounds 3 --steps 10 --ref-steps 2   # train.py's loop vs the bare step

Rows:
  bare              model.train_on_batch on one fixed batch (float32, no XLA, the default): the baseline
  bare xla          the same with jit_compile=True
  bare <precision>  the same under a mixed precision policy
  loop files        vqk.train_vqvae on a folder of PNGs, decoded every step, steady state
  loop files auto   the same with cache="auto", what train.py vqvae runs: a small folder kept in memory
  loop memory       vqk.train_vqvae on an in-memory array
  loop ... xla      the same with XLA (--jit; the default until it measured slower on CPU), also as
                    a ratio to the bare XLA step
  pytorch float32   the same architecture in PyTorch (TorchVQVAE below), same batch, Adam
  pytorch bf16 autocast   the same under torch.autocast("cpu", dtype=torch.bfloat16)
The bare and PyTorch rows are measured in rounds interleaved with each other, and the bare ones
again after the loop rows, so a machine that gets busier shows up as a drift between the two bare
figures. PyTorch is optional, not a dependency: without it, its rows are skipped with a message.
--memory: at the reference config (128 px, z_dim 128, batch 64), the RSS rise of a step over the
built model, Keras (its default step) and PyTorch float32, each in a fresh process: the peak during
the first step (Keras also traces its graph there) and during steps 2-3, each over the RSS of the
built model. RSS polled every 2 ms by a thread.
--demo also times a fixed workload (50 bare steps at the demo's config) right before and after the
demo, so that its wall time can be compared across machine loads as a number of workloads.
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


def time_steps(step, steps):
    """Seconds per call of step() (after up to 3 warm-up calls: fewer for the long steps of few-step rounds)."""
    for _ in range(min(3, steps)):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
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


def loop_step(config, data, steps, cache=None, deterministic=False):
    """Seconds per step of train_vqvae in steady state (no sample step inside the window)."""
    run = tempfile.mkdtemp(prefix="train_speed_")
    timer = StepTimer(skip=min(5, steps // 3))
    try:
        config = vqk.Config(**{**config.to_dict(), "sample_every": 10 ** 6})
        vqk.train_vqvae(config, run, steps=steps, data=data, callbacks=[timer], cache=cache,
                        deterministic=deterministic)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return timer.per_step()


class TorchVQVAE:
    """The reference's VQ-VAE in PyTorch, for comparison: what a user would pick instead.
    The same layers as models.py (Keras's "same" padding, BatchNorm momentum 0.99 / epsilon 1e-3),
    straight-through estimator, loss mse_x + mse_e + beta * mse_z, Adam; NCHW tensors. Built only
    when torch is importable: torch is not a dependency of the project."""

    def __init__(self, config, bfloat16=False):
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.torch, self.config, self.bfloat16 = torch, config, bfloat16
        d = config.z_dim

        def bn():
            return nn.BatchNorm2d(d, eps=1e-3, momentum=0.01)

        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(d, d, 3, padding=1), bn(), nn.ReLU(), nn.Conv2d(d, d, 1))

            def forward(self, x):
                return x + self.body(x)

        n = config.num_layers
        encoder = [nn.Conv2d(3, d, 4, 2, 1), bn(), nn.ReLU(), nn.Conv2d(d, d, 4, 2, 1), bn()]
        for i in range(n):
            encoder += [Residual()] + ([bn()] if i < n - 1 else [])
        decoder = [m for _ in range(n) for m in (bn(), Residual())]
        decoder += [nn.ConvTranspose2d(d, d, 4, 2, 1), bn(), nn.ReLU(), nn.ConvTranspose2d(d, 3, 4, 2, 1), nn.Tanh()]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.codebook = nn.Parameter(torch.empty(config.num_codes, d).uniform_(-0.05, 0.05))
        params = [*self.encoder.parameters(), *self.decoder.parameters(), self.codebook]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)

    def loss(self, x):
        torch = self.torch
        z = self.encoder(x).float()  # quantization in float32, as this project does
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        distances = (flat ** 2).sum(1, keepdim=True) + (self.codebook ** 2).sum(1) - 2 * flat @ self.codebook.T
        e = self.codebook[distances.argmin(1)].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        x_rec = self.decoder(z + (e - z).detach()).float()
        mse_x = torch.mean((x - x_rec) ** 2)
        mse_e = torch.mean((z.detach() - e) ** 2)
        mse_z = torch.mean((e.detach() - z) ** 2)
        return mse_x + mse_e + self.config.beta * mse_z

    def train_step(self, x):
        self.optimizer.zero_grad(set_to_none=True)
        with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bfloat16):
            loss = self.loss(x)
        loss.backward()
        self.optimizer.step()
        return loss


def torch_steps(config, x):
    """{label: step function} for PyTorch float32 and bfloat16 autocast, or {} (with a message)
    when torch is not installed."""
    # PyTorch's OpenMP threads spin while they wait: on a shared 2-core machine that made its steps
    # up to 7x slower than with passive waiting (same run). Set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        print("  pytorch: not installed, skipped (optional, not a dependency; pip install torch to compare)")
        return {}
    batch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    steps = {}
    for label, bfloat16 in (("pytorch float32", False), ("pytorch bf16 autocast", True)):
        model = TorchVQVAE(config, bfloat16)
        steps[label] = lambda model=model: model.train_step(batch).item()  # .item(): wait for the step
    return steps


def bench_config(name, config, steps, rounds, precisions, folder, loop=True):
    print(f"\n{name}: img_dim {config.img_dim}, z_dim {config.z_dim}, batch {config.batch_size}, {steps} steps a round")
    x = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, config.img_dim, config.img_dim, 3)).astype("float32")
    plain = vqk.Config(**{**config.to_dict(), "jit_compile": False})
    variants = {"bare": plain, "bare xla": vqk.Config(**{**config.to_dict(), "jit_compile": True})}
    for precision in precisions:
        variants[f"bare {precision}"] = vqk.Config(**{**plain.to_dict(), "precision": precision})
    models = {label: bare_model(c) for label, c in variants.items()}
    step_fns = {label: (lambda model=model: model.train_on_batch(x)) for label, model in models.items()}
    step_fns.update(torch_steps(config, x))  # interleaved with the Keras steps: the same machine load
    times = {label: [] for label in step_fns}
    for _ in range(rounds):
        for label, step in step_fns.items():
            times[label].append(time_steps(step, steps))
    images = vqk.load_images(folder, config.img_dim)
    loop_steps = steps + 8
    for jit in (False, True) if loop else ():  # the loop with and without XLA (train.py's default: without)
        loop = vqk.Config(**{**config.to_dict(), "jit_compile": jit})
        suffix = " xla" if jit else ""
        on_disk = vqk.Config(**{**loop.to_dict(), "data": folder})
        times["loop files" + suffix] = [loop_step(on_disk, folder, loop_steps)]
        times["loop files auto" + suffix] = [loop_step(on_disk, folder, loop_steps, cache="auto")]  # train.py's default
        times["loop memory" + suffix] = [loop_step(loop, images, loop_steps)]
    times["bare (after)"] = [time_steps(step_fns["bare"], steps)]
    times["bare xla (after)"] = [time_steps(step_fns["bare xla"], steps)]
    base, base_xla = min(times["bare"]), min(times["bare xla"])
    for label, values in times.items():
        best = min(values)
        same = f"   {best / base_xla:5.2f}x bare xla" if "xla" in label else ""
        print(f"  {label:22s} {1000 * best:8.1f} ms/step   {best / base:5.2f}x bare{same}")
    if "pytorch bf16 autocast" in times and "bare mixed_bfloat16" in times:
        ratio = min(times["bare mixed_bfloat16"]) / min(times["pytorch bf16 autocast"])
        print(f"  keras mixed_bfloat16 / pytorch bf16 autocast: {ratio:.2f}x (below 1: keras is faster)")


def bench_train_py(name, config, steps, rounds, folder):
    """What `train.py vqvae --data FOLDER` runs (the library loop on files, cache="auto", seeded with
    op determinism) against the bare step of the same config, in interleaved rounds: medians.
    train.py's op determinism is process-wide, so it is on for the bare step too."""
    import statistics

    from vq_vae_keras.training import seed_everything

    seed_everything(config.seed, config.jit_compile)
    x = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, config.img_dim, config.img_dim, 3))
    model, x = bare_model(config), x.astype("float32")
    on_disk = vqk.Config(**{**config.to_dict(), "data": folder})
    bare, loop = [], []
    for _ in range(rounds):
        bare.append(time_steps(lambda: model.train_on_batch(x), steps))
        loop.append(loop_step(on_disk, folder, steps + (8 if steps > 4 else 4), cache="auto", deterministic=True))
    b, lp = statistics.median(bare), statistics.median(loop)
    print(f"\n{name}: train.py vqvae's loop against the bare step (default config, jit_compile "
          f"{config.jit_compile}), {rounds} interleaved rounds, medians")
    print(f"  bare step      {1000 * b:8.1f} ms/step   rounds: {' '.join(f'{1000 * t:.0f}' for t in bare)}")
    print(f"  train.py loop  {1000 * lp:8.1f} ms/step   rounds: {' '.join(f'{1000 * t:.0f}' for t in loop)}   "
          f"{lp / b:.2f}x bare")


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_child(side, img_dim, z_dim):
    """In a fresh process: the peak RSS of the first step and of steps 2-3, minus the built model's, in MiB."""
    import threading

    config = vqk.Config(img_dim=img_dim, z_dim=z_dim, batch_size=64)
    x = np.random.default_rng(0).uniform(-1, 1, (64, img_dim, img_dim, 3)).astype("float32")
    step = torch_steps(config, x)["pytorch float32"] if side == "pytorch" else (
        lambda model=bare_model(config): model.train_on_batch(x))
    peak, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    built = rss_mib()
    threading.Thread(target=poll, daemon=True).start()
    step()
    first, peak[0] = peak[0], rss_mib()
    step(), step()
    done.set()
    print(f"MEMORY {first - built:.0f} {peak[0] - built:.0f}")


def bench_memory(img_dim, z_dim):
    print(f"\nmemory, {img_dim} px, z_dim {z_dim}, batch 64: RSS rise over the built model (MiB), fresh process each")
    for side in ("keras", "pytorch"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", side, str(img_dim), str(z_dim)],
                             capture_output=True, text=True).stdout
        line = [l for l in out.splitlines() if l.startswith("MEMORY")]
        first, later = line[0].split()[1:] if line else ("?", "?")
        print(f"  {side:8s} first step {first:>6s} MiB   steps 2-3 {later:>6s} MiB")


def time_demo(root):
    """Wall time of `python train.py`, and a fixed workload (50 bare steps at the demo's config)
    timed right before and after it: demo / workload is comparable across machine loads."""
    from vq_vae_keras.demo import DEMO_CONFIG

    config = vqk.Config(**{**DEMO_CONFIG, "jit_compile": True})
    model = bare_model(config)
    x = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, config.img_dim, config.img_dim, 3))
    x = x.astype("float32")
    before = 50 * time_steps(lambda: model.train_on_batch(x), 50)
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = 50 * time_steps(lambda: model.train_on_batch(x), 50)
    print(f"\ndemo (python train.py): {wall:.0f} s; 50 bare demo steps before {before:.1f} s, after {after:.1f} s: "
          f"the demo takes {wall / ((before + after) / 2):.1f} workloads")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="steps per round at 32 px (default 15)")
    parser.add_argument("--ref-steps", type=int, default=3, help="steps per round at the reference config (default 3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--z-dim", type=int, default=32, help="z_dim of the 32 px config (default 32; 128 is the "
                        "PyTorch target's config)")
    parser.add_argument("--skip-reference", action="store_true", help="only the 32 px config")
    parser.add_argument("--skip-small", action="store_true", help="only the reference config")
    parser.add_argument("--bare-only", action="store_true", help="bare and PyTorch steps only, no loop rows")
    parser.add_argument("--precisions", default="mixed_bfloat16", help="comma-separated (default mixed_bfloat16)")
    parser.add_argument("--demo", action="store_true", help="also time `python train.py` (writes runs/demo)")
    parser.add_argument("--train-py", action="store_true", help="instead: train.py vqvae's loop against the bare "
                        "step, interleaved rounds (turns on op determinism for the process, as train.py does)")
    parser.add_argument("--memory", action="store_true", help="also the RSS rise of a step, Keras and PyTorch")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)  # SIDE IMG_DIM Z_DIM, in a fresh process
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
    precisions = [p for p in args.precisions.split(",") if p]

    workdir = tempfile.mkdtemp(prefix="train_speed_data_")
    try:
        folder = make_demo_images(os.path.join(workdir, "images"), count=640, size=128)
        if not args.skip_small and not args.train_py:
            bench_config("32 px", vqk.Config(img_dim=32, z_dim=args.z_dim, batch_size=64), args.steps, args.rounds,
                         precisions, folder, loop=not args.bare_only)
        if not args.skip_reference and not args.train_py:
            bench_config("reference config", vqk.Config(), args.ref_steps, args.rounds, precisions, folder,
                         loop=not args.bare_only)
        if args.train_py:
            for name, config, steps in (("32 px", vqk.Config(img_dim=32, z_dim=args.z_dim, batch_size=64), args.steps),
                                        ("reference config", vqk.Config(), args.ref_steps)):
                if not (args.skip_small if config.img_dim == 32 else args.skip_reference):
                    bench_train_py(name, config, steps, args.rounds, folder)
        if args.memory:
            bench_memory(128, 128)  # the reference config: where memory matters
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.demo:
        time_demo(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    main()
