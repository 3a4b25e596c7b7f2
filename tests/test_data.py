"""Reading image folders: every mode to RGB in [-1, 1], bad files skipped, the reference's epochs."""

import os

import numpy as np
import pytest
from PIL import Image

import vq_vae_keras as vqk
from vq_vae_keras.data import ImageFolder, epoch_batches, read_image
from vq_vae_keras.errors import UsageError

from conftest import write_images


def test_scaling_matches_reference_formula(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = vqk.load_images(str(tmp_path), 16)  # same size: resize is the identity
    assert x.dtype == np.float32 and x.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(x[0], pixels.astype(np.float32) / 255 * 2 - 1, atol=1e-6)


def test_resize_is_bilinear_without_crop(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white: a crop would lose one of them
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = vqk.load_images(str(tmp_path), 16)[0]
    expected = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR), np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x[:, 0].max() == -1 and x[:, -1].min() == 1


def _write_all_kinds(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(rgb).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(rgb).save(folder / "x.bmp")
    Image.fromarray(rgb).save(folder / "x.webp")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rng.integers(0, 256, (2, 300, 3), dtype=np.uint8)).save(folder / "extreme.png")
    os.makedirs(folder / "nested" / "deeper")
    Image.fromarray(rgb).save(folder / "nested" / "deeper" / "UPPER.PNG")


def test_every_mode_becomes_rgb_in_range(tmp_path):
    _write_all_kinds(tmp_path)
    folder = ImageFolder(str(tmp_path), 16)
    assert len(folder) == 13  # recursive, extensions case-insensitive
    x = vqk.load_images(folder.paths, 16)
    assert x.shape == (13, 16, 16, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    grey = np.full((8, 8), 40000, np.uint16)  # 40000 / 65535 * 255 = 155.6
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = read_image(str(tmp_path / "g16.png"), 8)
    np.testing.assert_allclose(x, round(40000 / 257) / 255 * 2 - 1, atol=1e-6)


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # white left half, stored landscape
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = read_image(str(tmp_path / "rot.jpg"), 16)
    assert x[:4].mean() > 0.8 and x[-4:].mean() < -0.8  # white now on top


def test_bad_files_are_skipped_with_one_warning(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    x = vqk.load_images(str(tmp_path), 8)
    assert x.shape == (1, 8, 8, 3)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 3" in err


def test_truncated_image_is_dropped_during_training_batches(tmp_path, capsys):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"g{i}.png")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big)
    big.write_bytes(big.read_bytes()[:2000])  # header fine, data cut
    folder = ImageFolder(str(tmp_path), 8)
    assert len(folder) == 4  # passes the header check
    batch = folder.read_batch(range(4))
    assert batch.shape == (3, 8, 8, 3) and str(big) in folder.bad
    assert "skipping unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["missing", "empty", "non_images"])
def test_folder_without_images_is_a_usage_error(tmp_path, make):
    folder = tmp_path / "d"
    if make != "missing":
        folder.mkdir()
    if make == "non_images":
        (folder / "a.png").write_text("nope")
        (folder / "b.txt").write_text("nope")
    with pytest.raises(vqk.UsageError):
        ImageFolder(str(folder), 16)
    with pytest.raises(vqk.UsageError):
        vqk.load_images(str(folder), 16)


def test_epochs_follow_the_reference():
    batches = epoch_batches(10, 4, seed=3)
    epoch0 = [next(batches) for _ in range(3)]
    epoch1 = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]  # ceil(10 / 4) steps, the last smaller
    assert sorted(np.concatenate(epoch0)) == list(range(10))
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))  # reshuffled
    again = epoch_batches(10, 4, seed=3, start_step=4)  # resume: the same position
    np.testing.assert_array_equal(next(again), epoch1[1])


def test_cache_serves_the_same_batches_and_is_reused(tmp_path, monkeypatch):
    from vq_vae_keras import data

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "0.png").read_bytes()[:200])  # header fine, data cut
    plain = ImageFolder(str(tmp_path), 16)
    file = str(tmp_path / "cache" / "images.npz")
    cached = ImageFolder(str(tmp_path), 16).cache(file)
    assert cached.readable.sum() == 6 and os.path.isfile(file)
    plain_batches, cached_batches = plain.batches(4, seed=1), cached.batches(4, seed=1)
    for _ in range(6):  # three epochs, the broken file dropped from its batch in both
        np.testing.assert_array_equal(next(cached_batches), next(plain_batches))

    def no_decoding(path, img_dim):
        raise AssertionError("the cache file should have been reused")

    monkeypatch.setattr(data, "read_pixels", no_decoding)
    again = ImageFolder(str(tmp_path), 16).cache(file)
    np.testing.assert_array_equal(again.pixels, cached.pixels)
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "new.png")  # the folder changed
    assert ImageFolder(str(tmp_path), 16).cache(file).readable.sum() == 7


def test_unreadable_file_is_skipped(tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    os.chmod(secret, 0)
    if os.geteuid() == 0:  # root reads anything: refuse it as the OS would for another user
        real_open = Image.open

        def guarded_open(fp, *args, **kwargs):
            if str(fp) == str(secret):
                raise PermissionError(13, "Permission denied", str(secret))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", guarded_open)
    folder = ImageFolder(str(tmp_path), 8)
    assert folder.paths == [str(tmp_path / "good.png")]
    assert vqk.load_images(str(tmp_path), 8).shape == (1, 8, 8, 3)
    err = capsys.readouterr().err
    assert err.count("warning:") == 2 and "secret.png" in err


# ---- wide greyscale images: 16-bit frames, 32-bit and float images

def grey_value(path):
    """The 0..255 grey level that load_images gives a uniform image."""
    image = vqk.load_images([path], 8)[0]
    return float(np.round((image.mean() + 1) / 2 * 255))


def test_16_bit_frames_keep_their_brightness_order(tmp_path):
    levels = [100, 250, 300, 1000, 30000, 65535]  # a dark frame (max 250 of 65535) stays dark
    greys = []
    for level in levels:
        path = str(tmp_path / f"frame_{level}.png")
        Image.fromarray(np.full((8, 8), level, np.uint16)).save(path)
        greys.append(grey_value(path))
    assert greys == [round(level / 257) for level in levels]
    assert greys == sorted(greys)


def test_32_bit_and_float_images_by_their_declared_range(tmp_path):
    Image.fromarray(np.full((8, 8), 2 ** 30, np.int32)).save(tmp_path / "int32.tif")  # "I": half of 2**31 - 1
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(tmp_path / "float.tif")  # "F": [0, 1]
    assert Image.open(tmp_path / "int32.tif").mode == "I" and Image.open(tmp_path / "float.tif").mode == "F"
    assert grey_value(str(tmp_path / "int32.tif")) == 128
    assert grey_value(str(tmp_path / "float.tif")) == round(0.25 * 255)


# ---- random_images: unreadable files, no readable images

def broken_copies(folder, count):
    """PNGs whose header is fine but whose pixel data is cut off: they pass ImageFolder's check."""
    first = os.path.join(folder, sorted(os.listdir(folder))[0])
    data = open(first, "rb").read()
    for i in range(count):
        with open(os.path.join(folder, f"broken_{i}.png"), "wb") as f:
            f.write(data[:len(data) // 2])


@pytest.mark.parametrize("cached", [False, True])
def test_random_images_returns_n_even_when_most_files_are_unreadable(tmp_path, cached, capsys):
    folder = write_images(tmp_path / "images", count=2)
    broken_copies(folder, 10)
    images = ImageFolder(folder, 16)
    assert len(images) == 12  # the broken files pass the header check
    if cached:
        images.cache()
    drawn = images.random_images(20, np.random.default_rng(0))
    assert drawn.shape == (20, 16, 16, 3) and drawn.dtype == np.float32
    good = vqk.load_images(folder, 16)  # the two readable images
    assert all(any(np.array_equal(d, g) for g in good) for d in drawn)


def test_random_images_from_a_folder_without_readable_images_is_a_usage_error(tmp_path):
    folder = write_images(tmp_path / "images", count=1)
    broken_copies(folder, 3)
    os.remove(os.path.join(folder, "img_000.png"))
    with pytest.raises(UsageError, match="no readable images"):
        ImageFolder(folder, 16).random_images(4, np.random.default_rng(0))
