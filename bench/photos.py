"""Cut natural photographs into small training and held-out crops for bench/codebook_health.py.

    python bench/photos.py --photos DIR --out DIR [--held-out chelsea.png] [--train 2000] [--test 500]

Each crop is a random square of side 32 to 96 px (uniform) at a random place in a photo, resized to
--size px (bilinear). Training crops come from every photo except --held-out; held-out crops only
from that one, so the held-out score is on a scene the model never saw. Writes OUT/train/*.png and
OUT/held_out/*.png.

Photographs that ship with pip packages (real photos, not a dependency of this project):

    pip download --no-deps scikit-learn scikit-image -d wheels
    unzip -j wheels/scikit_learn-*.whl 'sklearn/datasets/images/*.jpg' -d photos
    unzip -j wheels/scikit_image-*.whl 'skimage/data/astronaut.png' 'skimage/data/coffee.png' \\
        'skimage/data/chelsea.png' 'skimage/data/rocket.jpg' 'skimage/data/motorcycle_left.png' -d photos
"""

import argparse
import os

import numpy as np
from PIL import Image


def random_crops(photo, count, size, rng):
    """count (size, size, 3) uint8 crops of a PIL photo, sides 32..96 px resized to size."""
    width, height = photo.size
    crops = []
    for _ in range(count):
        side = int(rng.integers(32, min(96, width, height) + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(np.asarray(photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)))
    return crops


def write(crops, folder):
    os.makedirs(folder, exist_ok=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(os.path.join(folder, f"crop_{i:05d}.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="folder of photographs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--held-out", default="chelsea.png", help="file name of the held-out photo")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    names = sorted(n for n in os.listdir(args.photos) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if args.held_out not in names:
        parser.error(f"--held-out {args.held_out} is not in {args.photos}")
    photos = {n: Image.open(os.path.join(args.photos, n)).convert("RGB") for n in names}
    train_names = [n for n in names if n != args.held_out]
    per_photo = np.full(len(train_names), args.train // len(train_names))
    per_photo[:args.train % len(train_names)] += 1
    write([c for n, k in zip(train_names, per_photo) for c in random_crops(photos[n], int(k), args.size, rng)],
          os.path.join(args.out, "train"))
    write(random_crops(photos[args.held_out], args.test, args.size, rng), os.path.join(args.out, "held_out"))
    print(f"{args.train} training crops from {', '.join(train_names)}; {args.test} held-out from {args.held_out}")


if __name__ == "__main__":
    main()
