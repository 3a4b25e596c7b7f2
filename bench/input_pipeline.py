"""Input pipeline: training steps fed from a folder of image files vs from memory, same model.

    python bench/input_pipeline.py [--images 512] [--size 512] [--img-dim 128] [--steps 8] [--rounds 3]

Writes --images files of --size x --size pixels (half PNG, half JPEG, photo-like: smooth colour
fields with grain) to a temporary folder, then times --steps VQ-VAE training steps at the given
config (default: the reference's 128 px, batch 64) three ways, in one run, with the same model:
  memory: batches from a NumPy array decoded beforehand (the baseline: no input work at all);
  files:  ImageFolder.dataset, decoding and resizing each batch on a thread pool, prefetched;
  cache:  the same after ImageFolder.cache() (train.py vqvae --cache), timed after the caching.
Prints the median seconds per step and each as a ratio to memory (target for files: <= 1.05).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vq_vae_keras as vqk  # noqa: E402  (first: it quiets TensorFlow's start-up)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from vq_vae_keras.data import ImageFolder, epoch_batches  # noqa: E402
from vq_vae_keras.models import compile_vqvae  # noqa: E402


def write_photos(folder, count, size, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        pixels = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(pixels).save(os.path.join(folder, f"photo_{i:04d}.{ext}"), quality=90)


class StepClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def time_steps(model, dataset, steps, warmup=2):
    """Seconds per step over `steps` steps of one fit, after `warmup` steps (tracing, first batches)."""
    clock = StepClock()
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[clock])
    return (clock.times[-1] - clock.times[warmup - 1]) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=512, help="side of the written files (default 512)")
    parser.add_argument("--img-dim", type=int, default=128, help="training resolution (default 128, the reference)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per feed and round (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the three feeds (default 3)")
    args = parser.parse_args()

    config = vqk.Config(img_dim=args.img_dim, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_photos(folder, args.images, args.size)
        megabytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
        print(f"{args.images} files of {args.size}x{args.size} ({megabytes:.0f} MiB) written in "
              f"{time.perf_counter() - start:.1f} s; training at {args.img_dim} px, batch {args.batch_size}")

        images = ImageFolder(folder, config.img_dim)
        keras.utils.set_random_seed(0)
        model = compile_vqvae(vqk.build_vqvae(config))

        array = vqk.load_images(images.paths, config.img_dim)

        def from_memory():
            for indices in epoch_batches(len(array), config.batch_size, seed=0):
                yield array[indices]

        spec = tf.TensorSpec((None, config.img_dim, config.img_dim, 3), tf.float32)
        memory = tf.data.Dataset.from_generator(from_memory, output_signature=spec)
        memory = memory.map(lambda x: (x, x)).prefetch(tf.data.AUTOTUNE)

        files = images.dataset(config.batch_size, seed=0)
        start = time.perf_counter()
        cached = ImageFolder(folder, config.img_dim).cache()
        caching = time.perf_counter() - start
        feeds = {"memory": memory, "files": files, "cache": cached.dataset(config.batch_size, seed=0)}
        # Rounds interleave the feeds, so a slow spell of the machine does not land on one of them.
        times = {name: [] for name in feeds}
        for _ in range(args.rounds):
            for name, dataset in feeds.items():
                times[name].append(time_steps(model, dataset, args.steps))

    baseline = np.median(times["memory"])
    for name, seconds in times.items():
        print(f"  {name:7s} {np.median(seconds):7.3f} s/step (median of {args.rounds} rounds of {args.steps} steps)"
              f"   ratio to memory {np.median(seconds) / baseline:.3f}")
    print(f"  (caching the {args.images} images took {caching:.1f} s, once)")


if __name__ == "__main__":
    main()
