"""Faults that must end in one sentence, never a traceback or a crash: a disk that fills while
files are written (each writer, and training end to end), and every file the project reads back
found damaged.

A full disk is stood in for by RLIMIT_FSIZE (`ulimit -f`): a write past the limit fails in the
kernel with EFBIG (Python ignores SIGXFSZ), a real OS-level failure, through every library on
the way, as ENOSPC would be.
"""

import contextlib
import csv
import os
import re
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train
import vq_vae_keras as vqk
from vq_vae_keras import io
from vq_vae_keras.callbacks import StepLog
from vq_vae_keras.data import ImageFolder
from vq_vae_keras.errors import WriteFailed
from vq_vae_keras.models import compile_vqvae

from conftest import ROOT, TINY_FLAGS, call_main, tiny_config, write_images

LIMIT = 4096  # bytes a file may hold under file_size_limit: less than any writer below writes


@contextlib.contextmanager
def file_size_limit(nbytes):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def model():
    vqvae = vqk.build_vqvae(tiny_config())
    compile_vqvae(vqvae).optimizer.build(vqvae.train_model.trainable_variables)
    return vqvae.train_model


def step_log(path):
    log = StepLog(path, ["loss"], steps_per_epoch=3)
    log.rows = [{"step": i, "epoch": 0, "loss": 0.5} for i in range(1, 2000)]
    return log.flush


WRITERS = {  # name -> (file name, writer of a file larger than LIMIT)
    "config.json": ("config.json", lambda path, m: tiny_config(classes=[f"class {i:04d}" for i in range(400)]).save(path)),
    "weights": ("vqvae.weights.h5", lambda path, m: io.save_weights(m, path)),
    "keras file": ("vqvae.keras", lambda path, m: io.save_model(m, path)),
    "checkpoint": ("vqvae.npz", lambda path, m: io.save_checkpoint(path, m, m.optimizer, {"step": 1})),
    "codes.npy": ("codes.npy", lambda path, m: io.save_npy(path, np.zeros((100, 4, 4), np.int32))),
    "cache npz": ("cache.npz", lambda path, m: io.save_npz(path, pixels=np.ones((10, 16, 16, 3), np.uint8))),
    "grid png": ("grid.png", lambda path, m: io.save_png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                                                 dtype=np.uint8))),
    "json text": ("eval.json", lambda path, m: io.atomic_write_text(path, "{}" + " " * 10000)),
    "log.csv rows": ("log.csv", lambda path, m: step_log(path)()),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_write_on_a_full_disk_is_write_failed_and_the_old_file_stays(model, tmp_path, name):
    filename, write = WRITERS[name]
    path = str(tmp_path / filename)
    with open(path, "w") as f:
        f.write("step,epoch,loss\n" if filename == "log.csv" else "the previous version")
    before = open(path, "rb").read()
    with file_size_limit(LIMIT), pytest.raises(WriteFailed) as raised:
        write(path, model)
    message = str(raised.value)
    assert message == f"cannot write {path}: file too large", message
    assert open(path, "rb").read() == before  # no half file, no half row
    assert os.listdir(tmp_path) == [filename]  # no temporary file left behind


def test_the_image_cache_on_a_full_disk(tmp_path):
    folder = ImageFolder(write_images(tmp_path / "images", count=20), 16)
    with file_size_limit(LIMIT), pytest.raises(WriteFailed, match="cache.npz: file too large"):
        folder.cache(str(tmp_path / "cache.npz"), progress=False)
    assert not os.path.exists(tmp_path / "cache.npz")


def test_the_demo_images_on_a_full_disk(tmp_path):
    from vq_vae_keras.data import make_demo_images

    with file_size_limit(256), pytest.raises(WriteFailed, match=r"shape_00000.png: file too large$"):
        make_demo_images(str(tmp_path / "demo"), count=2, size=64)


def test_a_file_where_a_folder_should_be(model, tmp_path):
    (tmp_path / "notes").write_text("a file")
    for write in (lambda p: io.atomic_write_text(p, "{}"), lambda p: io.save_weights(model, p)):
        path = str(tmp_path / "notes" / "sub" / "eval.json")
        with pytest.raises(WriteFailed) as raised:
            write(path)
        assert str(raised.value) == f"cannot write {path}: {tmp_path / 'notes'} is a file, not a folder"


def test_resume_advice_says_whether_a_checkpoint_is_there(tmp_path):
    checkpoint = str(tmp_path / "vqvae.npz")
    with pytest.raises(WriteFailed, match=r"file too large; no checkpoint was written yet"):
        with io.resumable(checkpoint), file_size_limit(LIMIT):
            io.atomic_write_text(str(tmp_path / "a.txt"), "x" * 10000)
    open(checkpoint, "w").close()
    with pytest.raises(WriteFailed) as raised:
        with io.resumable(checkpoint), io.resumable(checkpoint), file_size_limit(LIMIT):
            io.atomic_write_text(str(tmp_path / "a.txt"), "x" * 10000)
    assert str(raised.value).count("--resume") == 1 and f"({checkpoint}) is intact" in str(raised.value)


# ----------------------------------------------------------------------------- training on a full disk

def train_cli(*args, limit=None):
    """train.py in a fresh process, under a file size limit if given."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300, preexec_fn=limited if limit else None)


TF_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def errors_of(result):
    """The lines of stderr that are not the progress bar (an error may follow a bar on its line),
    nor TensorFlow's C++ log (TF 2.16 writes its XLA notices before it reads TF_CPP_MIN_LOG_LEVEL)."""
    lines = [line[line.find("error:"):] if "error:" in line else line for line in result.stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line.strip() and not line.startswith(("vqvae:", "prior:"))
            and not TF_LOG_LINE.match(line)]


@pytest.mark.slow
def test_disk_full_while_training_is_one_sentence_and_resume_finishes(tmp_path):
    """Once crashed with h5py's traceback and then a segmentation fault (HDF5's exit handler
    closing a file whose flush had failed)."""
    data, run = write_images(tmp_path / "images", count=12), str(tmp_path / "run")
    vqvae = ["vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--sample-every", "2"]
    assert train_cli(*vqvae, "--steps", "2").returncode == 0
    weights_size = os.path.getsize(os.path.join(run, "vqvae.weights.h5"))
    limit = weights_size // 2  # the weights no longer fit; the config, logs and grids do
    assert max(os.path.getsize(os.path.join(run, name)) for name in ("config.json", "log.csv")) < limit
    assert max(os.path.getsize(os.path.join(run, "samples", name)) for name in os.listdir(os.path.join(run, "samples"))) < limit
    checkpoint = open(os.path.join(run, "checkpoint", "vqvae.npz"), "rb").read()

    full = train_cli(*vqvae, "--steps", "6", "--resume", limit=limit)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and len(errors_of(full)) == 1, full.stderr[-3000:]
    message = errors_of(full)[0]
    assert message.startswith(f"error: cannot write {os.path.join(run, 'vqvae.weights.h5')}: file too large;"), message
    assert "is intact" in message and "--resume" in message, message
    assert open(os.path.join(run, "checkpoint", "vqvae.npz"), "rb").read() == checkpoint
    assert not [name for name in os.listdir(run) if name.startswith(".tmp-")]

    again = train_cli(*vqvae, "--steps", "6", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    with open(os.path.join(run, "log.csv"), newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_disk_full_before_the_first_checkpoint(tmp_path):
    data, run = write_images(tmp_path / "images", count=12), str(tmp_path / "run")
    full = train_cli("vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "4", limit=40000)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert errors_of(full) == [f"error: cannot write {os.path.join(run, 'vqvae.weights.h5')}: file too large; "
                               "no checkpoint was written yet, so the run cannot resume: make room and train it anew"]
    resume = train_cli("vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "4", "--resume")
    assert resume.returncode == 2 and errors_of(resume) == [
        f"error: --resume: {run} stopped before its first checkpoint; train it anew: the same command without --resume"]
    anew = train_cli("vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "4")  # as the advice says
    assert anew.returncode == 0, anew.stderr[-3000:]


# ----------------------------------------------------------------------------- damaged files read back

def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00\x01 not what it should be \xff" * 10)


def make_conditional(run):
    """A run whose prior is class-conditional, as far as reading labels.npy goes."""
    config = vqk.Config.load(os.path.join(run, "config.json"))
    config.classes = ["a", "b"]
    config.save(os.path.join(run, "config.json"))
    io.save_npy(os.path.join(run, "labels.npy"), np.zeros(16, np.int32))


# (file, how it is damaged, command line, fragment of the one-line error); {run} is a copy of the run
DAMAGED = [
    ("config.json", truncate, "train.py vqvae --data {data} --run {run} --resume --steps 9", "cannot read config"),
    ("config.json", garbage, "sample.py random --run {run}", "cannot read config"),
    ("vqvae.weights.h5", truncate, "sample.py recon --run {run} --data {data}", "cannot load VQ-VAE weights"),
    ("vqvae.weights.h5", garbage, "sample.py evaluate --run {run} --data {data}", "cannot load VQ-VAE weights"),
    ("prior.weights.h5", truncate, "sample.py random --run {run}", "cannot load prior weights"),
    ("prior.weights.h5", garbage, "sample.py random --run {run}", "cannot load prior weights"),
    ("checkpoint/vqvae.npz", truncate, "train.py vqvae --data {data} --run {run} --resume --steps 9",
     "cannot read checkpoint"),
    ("checkpoint/vqvae.npz", garbage, "train.py vqvae --data {data} --run {run} --resume --steps 9",
     "cannot read checkpoint"),
    ("checkpoint/prior.npz", truncate, "train.py prior --run {run} --resume --steps 99", "cannot read checkpoint"),
    ("codes.npy", truncate, "train.py prior --run {run} --resume --steps 99", "codes.npy"),
    ("codes.npy", garbage, "train.py prior --run {run} --resume --steps 99", "codes.npy"),
    ("labels.npy", truncate, "train.py prior --run {run} --resume --steps 99", "labels.npy"),
    ("labels.npy", garbage, "train.py prior --run {run} --resume --steps 99", "labels.npy"),
    ("cache.npz", truncate, "train.py vqvae --data {data} --run {new} --cache {run}/cache.npz", "cannot read image cache"),
]


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("damaged")
    cache = str(base / "cache.npz")
    ImageFolder(trained_run["data"], 16).cache(cache, progress=False)
    count = iter(range(1000))

    def copy(prepare=None):
        target = str(base / f"run{next(count)}")
        shutil.copytree(trained_run["run"], target)
        shutil.copy(cache, target)
        if prepare:
            prepare(target)
        return target

    return copy, trained_run["data"], str(base / "new")


@pytest.mark.parametrize("name, damage, line, fragment", DAMAGED,
                         ids=[f"{name}-{damage.__name__}-{line.split()[1]}" for name, damage, line, _ in DAMAGED])
def test_a_damaged_file_is_one_line_exit_2(run_copy, name, damage, line, fragment):
    import sample

    copy, data, new = run_copy
    run = copy(make_conditional if name == "labels.npy" else None)
    damage(os.path.join(run, name))
    words = [w.format(run=run, data=data, new=new) for w in line.split()]
    status, _, stderr = call_main({"train.py": train, "sample.py": sample}[words[0]].main, words[1:])
    lines = stderr.strip().splitlines()
    errors = [x for x in lines if not x.startswith(("vqvae:", "prior:", "encoding:", "caching"))]
    assert status == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and fragment in errors[0] and os.path.basename(name) in errors[0], stderr[-3000:]
    assert "\n" not in errors[0]


@pytest.mark.parametrize("log, damage", [(log, damage) for log in ("log.csv", "eval_log.csv")
                                          for damage in ("cut", "garbage", "no step column")] + [("prior_log.csv", "cut")])
def test_resume_with_a_damaged_log_keeps_it_aside_and_goes_on(run_copy, tmp_path, log, damage):
    copy, data, _ = run_copy
    run = copy()
    path = os.path.join(run, log)
    if log == "eval_log.csv":
        io.atomic_write_text(path, "step,psnr,ssim,codes_used\n1,10.5,0.25,3\n2,11.5,0.5,4\n")
    text = open(path).read()
    damaged = {"cut": text + "3,0,1.2", "garbage": text + "\x00\xff garbage\n", "no step column": "x,y\n1,2\n"}[damage]
    with open(path, "w", newline="") as f:
        f.write(damaged)
    if log == "prior_log.csv":
        argv = ["prior", "--run", run, "--resume", "--steps", "8"]
    else:
        argv = ["vqvae", "--data", data, "--run", run, "--resume", "--steps", "7"]
        argv += ["--eval-data", data, "--eval-every", "2"] if log == "eval_log.csv" else []
    status, _, stderr = call_main(train.main, argv)
    assert status == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"warning: {path} is damaged" in stderr and f"kept as {path}.damaged" in stderr
    assert open(path + ".damaged", newline="").read() == damaged
    with open(path, newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    kept = {"log.csv": [1, 2, 3, 4, 5], "eval_log.csv": [1, 2], "prior_log.csv": [4, 6]}[log]
    kept = [] if damage == "no step column" else kept
    assert steps[:len(kept)] == kept and steps[-1] == (8 if log == "prior_log.csv" else 7), steps
    assert steps == sorted(set(steps))


def test_an_empty_log_is_no_damage(tmp_path):
    path = str(tmp_path / "log.csv")
    open(path, "w").close()
    StepLog(path, ["loss"], 3, start=4, resume=True)
    assert not os.path.exists(path + ".damaged") and open(path).read() == "step,epoch,loss\n"


def test_a_second_damaged_log_does_not_overwrite_the_first(tmp_path, capsys):
    """Each damaged log is kept aside under a name of its own: a run damaged three times (crashes
    mid-write) keeps all three, never replacing what an earlier one kept aside."""
    from vq_vae_keras.callbacks import log_rows_until

    path = str(tmp_path / "log.csv")
    damages = {"1,0,0.5\n2,0,0.4\n3,0": ["1", "2"], "1,0,0.5\n\x00 garbage\n": ["1"], "1,0,0.5\n2,0": ["1"]}
    for damage, kept in damages.items():
        with open(path, "w", newline="") as f:
            f.write("step,epoch,loss\n" + damage)
        assert [row["step"] for row in log_rows_until(path, 10)] == kept
        assert "is damaged" in capsys.readouterr().err
    assert not os.path.exists(path)
    aside = [path + ".damaged", path + ".damaged.2", path + ".damaged.3"]
    assert [open(name, newline="").read() for name in aside] == ["step,epoch,loss\n" + d for d in damages]
