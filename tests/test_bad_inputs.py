"""Bad input, by class: every flag of train.py and sample.py, with the values a new user might try.

Each row is (command line, a fragment of the one-line error). Every row must exit with status 2,
print exactly one line on stderr containing the fragment (no traceback), and change no file: the
trained run and the broken copies are hashed around every row, and a new --run must not appear.
Numeric flags also get NaN and infinities automatically (found by their argparse type).
`test_every_flag_has_a_row` fails when a flag of either parser has no row: add one below.

Placeholders in the command lines:
  {data}     a folder of images            {run}      a trained run (VQ-VAE and prior)
  {new}      a run path that must not come into being
  {file}     a text file                   {missing}  a path that does not exist
  {empty}    an empty folder               {noimages} a folder of files that are not images
  {noprior}  a run with a VQ-VAE and no prior
  {badconfig} {emptyconfig} {typoconfig} {otherconfig} {badweights} {badprior} {badckpt} {badcodes} {nocodes} {textcodes}
             copies of {run} with one file broken (see `broken_runs`)
  {badcache} a file.npz that is not an image cache
"""

import argparse
import hashlib
import os
import shlex
import shutil

import numpy as np
import pytest

import sample
import train
import vq_vae_keras as vqk
from vq_vae_keras import cli
from vq_vae_keras.data import ImageFolder

from conftest import call_main, run_cli

ROWS = [
    # ---- train.py vqvae: paths
    ("train.py vqvae --data {file} --run {new}", "argument --data: not a folder"),
    ("train.py vqvae --data {missing} --run {new}", "argument --data: no such folder"),
    ("train.py vqvae --data {empty} --run {new} --steps 1", "no usable images"),
    ("train.py vqvae --data {noimages} --run {new} --steps 1", "no usable images"),
    ("train.py vqvae --run {new} --steps 1", "arguments are required: --data"),
    ("train.py vqvae --data {data} --steps 1", "arguments are required: --run"),
    ("train.py vqvae --data {data} --run {file}", "argument --run: "),
    ("train.py vqvae --data {data} --run {run} --steps 1", "already holds a run; add --resume"),
    ("train.py vqvae --data {data} --run {new} --resume", "--resume: no run to resume"),
    ("train.py vqvae --data {data} --run {badconfig} --resume", "cannot read config"),
    ("train.py vqvae --data {data} --run {emptyconfig} --resume", "cannot read config"),
    ("train.py vqvae --data {data} --run {typoconfig} --resume", "lr must be a number"),
    ("train.py vqvae --data {data} --run {badckpt} --resume --steps 9", "cannot read checkpoint"),
    ("train.py vqvae --data {data} --run {run} --resume --img-dim 32", "--img-dim 32 contradicts"),
    ("train.py vqvae --data {data} --run {new} --cache {empty}", "argument --cache: "),
    ("train.py vqvae --data {data} --run {new} --cache {badcache} --img-dim 16", "cannot read image cache"),
    ("train.py vqvae --data {data} --run {new} --cache images.zip", "argument --cache: images.zip must end in .npz"),
    # ---- train.py vqvae: numbers out of range (NaN and infinities are added for every number below)
    ("train.py vqvae --data {data} --run {new} --img-dim 15", "--img-dim: img_dim must be a multiple of 4"),
    ("train.py vqvae --data {data} --run {new} --img-dim 8", "--img-dim: img_dim must be a multiple of 4"),
    ("train.py vqvae --data {data} --run {new} --img-dim 1.5", "argument --img-dim"),
    ("train.py vqvae --data {data} --run {new} --z-dim 0", "argument --z-dim: must be >= 1"),
    ("train.py vqvae --data {data} --run {new} --num-codes 1", "--num-codes: num_codes must be at least 2"),
    ("train.py vqvae --data {data} --run {new} --batch-size -4", "argument --batch-size"),
    ("train.py vqvae --data {data} --run {new} --lr 0", "argument --lr: must be > 0"),
    ("train.py vqvae --data {data} --run {new} --lr -1e-3", "argument --lr"),
    ("train.py vqvae --data {data} --run {new} --lr fast", "argument --lr: 'fast' is not a valid float"),
    ("train.py vqvae --data {data} --run {new} --beta -0.25", "argument --beta: must be >= 0"),
    ("train.py vqvae --data {data} --run {new} --sample-every 0", "argument --sample-every"),
    ("train.py vqvae --data {data} --run {new} --seed -1", "argument --seed"),
    ("train.py vqvae --data {data} --run {new} --seed 4294967296", "argument --seed"),
    ("train.py vqvae --data {data} --run {new} --steps 0", "argument --steps"),
    ("train.py vqvae --data {data} --run {new} --steps 4294967296", "argument --steps: must be in [1, 2147483647]"),
    ("train.py vqvae --data {data} --run {new} --epochs 0", "argument --epochs"),
    ("train.py vqvae --data {data} --run {new} --steps 2 --epochs 2", "not allowed with argument"),
    # ---- train.py vqvae: learning-rate schedule
    ("train.py vqvae --data {data} --run {new} --lr-schedule step", "argument --lr-schedule: invalid choice"),
    ("train.py vqvae --data {data} --run {new} --warmup-steps -1", "argument --warmup-steps: must be >= 0"),
    ("train.py vqvae --data {data} --run {new} --warmup-steps 8 --steps 8",
     "--warmup-steps: warmup_steps 8 must be fewer than the run's 8 steps"),
    ("train.py vqvae --data {data} --run {new} --lr-min-ratio 0.1",
     "--lr-min-ratio: lr_min_ratio applies to lr_schedule cosine, not constant"),
    ("train.py vqvae --data {data} --run {new} --lr-schedule cosine --lr-min-ratio 1",
     "argument --lr-min-ratio: must be in [0, 1)"),
    ("train.py vqvae --data {data} --run {run} --resume --lr-schedule cosine", "--lr-schedule cosine contradicts"),
    # ---- train.py vqvae: codebook options
    ("train.py vqvae --data {data} --run {new} --quantizer kmeans", "argument --quantizer: invalid choice"),
    ("train.py vqvae --data {data} --run {new} --quantizer ema --ema-decay 1", "argument --ema-decay: must be in (0, 1)"),
    ("train.py vqvae --data {data} --run {new} --quantizer ema --ema-decay 0", "argument --ema-decay"),
    ("train.py vqvae --data {data} --run {new} --ema-decay 0.9", "--ema-decay applies to --quantizer ema"),
    ("train.py vqvae --data {data} --run {new} --restart-dead -1", "argument --restart-dead"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --kmeans-init", "apply to the vq and ema"),
    ("train.py vqvae --data {data} --run {new} --kmeans-init=yes", "ignored explicit argument"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --gumbel-temperature 0", "--gumbel-temperature"),
    ("train.py vqvae --data {data} --run {new} --gumbel-temperature 0.5", "applies to --quantizer gumbel"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --gumbel-temperature-end -1",
     "argument --gumbel-temperature-end"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --gumbel-anneal-steps 0", "--gumbel-anneal-steps"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --gumbel-schedule cosh", "invalid choice"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --gumbel-kl-weight -1", "--gumbel-kl-weight"),
    ("train.py vqvae --data {data} --run {new} --levels 3", "argument --levels: invalid choice"),
    ("train.py prior --run {run} --level top", "this run has one level of codes"),
    ("train.py prior --run {run} --level middle", "argument --level: invalid choice"),
    ("train.py vqvae --data {data} --run {new} --levels 2 --img-dim 20", "img_dim must be a multiple of 8 with levels 2"),
    ("train.py vqvae --data {data} --run {new} --top-num-codes 8", "top_num_codes applies to levels 2"),
    ("train.py vqvae --data {data} --run {new} --levels 2 --top-num-codes 1", "top_num_codes must be at least 2"),
    ("train.py vqvae --data {data} --run {new} --levels 2 --quantizer fsq --fsq-levels 4,4 --top-num-codes 8",
     "both levels take fsq_levels"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq", "--quantizer fsq needs --fsq-levels"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 4,x", "argument --fsq-levels: "),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 1,64", "each level must be at least 2"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 256,256,2", "more than 65536"),
    ("train.py vqvae --data {data} --run {new} --fsq-levels 4,4,4", "--fsq-levels: fsq_levels apply to quantizer fsq, not vq"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 4,4 --num-codes 64",
     "--num-codes: num_codes must be the product of fsq_levels"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 4,4,4 --beta 0.5", "--beta (the commitment"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 4,4,4 --kmeans-init", "not fsq"),
    ("train.py vqvae --data {data} --run {new} --quantizer fsq --fsq-levels 4,4,4 --rotation-trick",
     "--rotation-trick: rotation_trick applies to the vq and ema quantizers, not fsq"),
    ("train.py vqvae --data {data} --run {new} --quantizer gumbel --cosine-codebook",
     "--cosine-codebook: cosine_codebook applies to the vq and ema quantizers, not gumbel"),
    ("train.py vqvae --data {data} --run {new} --rotation-trick=yes", "ignored explicit argument"),
    ("train.py vqvae --data {data} --run {run} --resume --cosine-codebook", "--cosine-codebook True contradicts"),
    ("train.py vqvae --data {data} --run {new} --no-such-flag", "unrecognized arguments"),
    # ---- train.py vqvae: speed and logging
    ("train.py vqvae --data {data} --run {new} --precision float16", "argument --precision: invalid choice"),
    ("train.py vqvae --data {data} --run {new} --precision", "argument --precision: expected one argument"),
    ("train.py vqvae --data {data} --run {new} --jit=yes", "ignored explicit argument"),
    ("train.py vqvae --data {data} --run {new} --no-jit=1", "ignored explicit argument"),
    ("train.py vqvae --data {data} --run {run} --resume --precision mixed_float16", "--precision mixed_float16 contradicts"),
    ("train.py vqvae --data {data} --run {new} --tensorboard=on", "ignored explicit argument"),
    # ---- several devices
    ("train.py vqvae --data {data} --run {new} --distribute gpus", "argument --distribute: invalid choice"),
    ("train.py vqvae --data {data} --run {new} --cpu-replicas 0", "argument --cpu-replicas: must be >= 1"),
    ("train.py vqvae --data {data} --run {new} --cpu-replicas 2", "--cpu-replicas applies to --distribute mirrored"),
    ("train.py vqvae --data {data} --run {new} --distribute multiworker --cpu-replicas 2", "cpu_replicas applies to"),
    ("train.py vqvae --data {data} --run {new} --distribute multiworker", "needs the TF_CONFIG"),
    ("train.py vqvae --data {data} --run {new} --sync-batchnorm=1", "ignored explicit argument"),
    ("train.py vqvae --data {data} --run {new} --sync-batchnorm", "--sync-batchnorm applies to --distribute"),
    ("train.py vqvae --data {data} --run {new} --eval-data {file}", "argument --eval-data: not a folder"),
    ("train.py vqvae --data {data} --run {new} --eval-data {missing}", "argument --eval-data: no such folder"),
    ("train.py vqvae --data {data} --run {new} --eval-data {empty} --steps 1", "no readable images"),
    ("train.py vqvae --data {data} --run {new} --eval-every 0", "argument --eval-every"),
    ("train.py vqvae --data {data} --run {new} --eval-every 5", "--eval-every needs --eval-data"),
    ("train.py resample", "invalid choice"),
    # ---- train.py prior
    ("train.py prior --run {missing}", "argument --run: no such folder"),
    ("train.py prior --run {file}", "argument --run: not a folder"),
    ("train.py prior --run {empty}", "no config at"),
    ("train.py prior --run {run} --steps 1", "add --resume to continue it, or --restart"),
    ("train.py prior --run {run} --resume --restart", "not allowed with argument"),
    ("train.py prior --run {noprior} --resume --steps 1", "no prior checkpoint"),
    ("train.py prior --run {noprior} --data {file}", "argument --data: not a folder"),
    ("train.py prior --run {noprior} --data {empty} --steps 1", "no usable images"),
    ("train.py prior --run {run} --restart --data {missing}", "argument --data: no such folder"),
    ("train.py prior --run {run} --restart --data {empty} --steps 1", "no usable images"),
    ("train.py prior --run {run} --restart --data {noimages} --steps 1", "no usable images"),
    ("train.py prior --run {badconfig}", "cannot read config"),
    ("train.py prior --run {emptyconfig}", "cannot read config"),
    ("train.py prior --run {typoconfig}", "lr must be a number"),
    ("train.py prior --run {badweights} --restart --steps 1", "cannot load VQ-VAE weights"),
    ("train.py prior --run {badckpt} --resume --steps 99", "cannot read checkpoint"),
    ("train.py prior --run {badcodes} --resume --steps 99", "codes.npy"),
    ("train.py prior --run {nocodes} --resume --steps 99", "codes.npy has shape (0, 4, 4)"),
    ("train.py prior --run {textcodes} --resume --steps 99", "cannot read"),
    ("train.py prior --run {run} --resume --batch-size 0", "argument --batch-size"),
    ("train.py prior --run {run} --resume --batch-size 8", "--batch-size 8 contradicts"),
    ("train.py prior --run {run} --seed -3", "argument --seed"),
    ("train.py prior --run {run} --resume --steps 0", "argument --steps"),
    ("train.py prior --run {run} --resume --epochs -1", "argument --epochs"),
    ("train.py prior --run {run} --restart=1", "ignored explicit argument"),
    ("train.py prior --run {noprior} --val-split 1", "--val-split: val_split must be in [0, 1)"),
    ("train.py prior --run {noprior} --val-split -0.1", "argument --val-split"),
    ("train.py prior --run {run} --resume --val-split 0.2", "--val-split 0.2 contradicts"),
    ("train.py prior --run {run} --resume --lr 0", "argument --lr: must be > 0"),
    ("train.py prior --run {run} --resume --lr 0.01", "--lr 0.01 contradicts the run's saved prior_lr"),
    ("train.py prior --run {noprior} --lr-schedule linear", "argument --lr-schedule: invalid choice"),
    ("train.py prior --run {noprior} --warmup-steps 1.5", "argument --warmup-steps"),
    ("train.py prior --run {noprior} --warmup-steps 6 --steps 6",
     "--warmup-steps: prior_warmup_steps 6 must be fewer than the run's 6 steps"),
    ("train.py prior --run {noprior} --lr-min-ratio 0",
     "--lr-min-ratio applies to --lr-schedule cosine, this run uses constant"),
    ("train.py prior --run {noprior} --lr-schedule cosine --lr-min-ratio -0.1", "argument --lr-min-ratio"),
    ("train.py prior --run {run} --resume --lr-schedule cosine", "--lr-schedule cosine contradicts"),
    ("train.py prior --run {noprior} --sample-every-epochs -1", "argument --sample-every-epochs"),
    ("train.py prior --run {noprior} --sample-every-epochs 1.5", "argument --sample-every-epochs"),
    ("train.py prior --run {noprior} --jit=1", "ignored explicit argument"),
    ("train.py prior --run {noprior} --no-jit=1", "ignored explicit argument"),
    ("train.py prior --run {noprior} --tensorboard=1", "ignored explicit argument"),
    ("train.py prior --run {noprior} --prior rnn", "argument --prior: invalid choice"),
    ("train.py prior --run {run} --resume --prior pixelcnn", "--prior pixelcnn contradicts"),
    ("train.py prior --run {noprior} --prior pixelcnn --pixelcnn-width 0", "argument --pixelcnn-width"),
    ("train.py prior --run {noprior} --prior pixelcnn --pixelcnn-depth 0", "argument --pixelcnn-depth"),
    ("train.py prior --run {noprior} --prior pixelcnn --pixelcnn-kernel 4", "--pixelcnn-kernel: pixelcnn_kernel must be odd"),
    ("train.py prior --run {noprior} --pixelcnn-kernel 3", "--pixelcnn-kernel applies to --prior pixelcnn"),
    ("train.py prior --run {noprior} --classes --steps 1", "not in a class subfolder"),
    ("train.py prior --run {run} --resume --classes", "--classes contradicts the run's saved prior"),
    ("train.py prior --run {noprior} --classes=1", "ignored explicit argument"),
    ("train.py prior --run {noprior} --distribute all", "argument --distribute: invalid choice"),
    ("train.py prior --run {noprior} --cpu-replicas -2", "argument --cpu-replicas"),
    # ---- sample.py
    ("sample.py", "the following arguments are required: command"),
    ("sample.py recon --run {missing} --data {data}", "argument --run: no such folder"),
    ("sample.py recon --run {file} --data {data}", "argument --run: not a folder"),
    ("sample.py recon --run {empty} --data {data}", "no config at"),
    ("sample.py recon --run {run} --data {file}", "argument --data: not a folder"),
    ("sample.py recon --run {run} --data {noimages}", "no usable images"),
    ("sample.py recon --run {run} --data {data} --n 3", "--n must be even"),
    ("sample.py recon --run {run} --data {data} --n 0", "argument --n"),
    ("sample.py recon --run {run} --data {data} --n 66", "argument --n: must be in [1, 64]"),
    ("sample.py recon --run {run} --data {data} --out recon.jpg", "argument --out: recon.jpg must end in .png"),
    ("sample.py recon --run {run} --data {data} --seed -1", "argument --seed"),
    ("sample.py recon --run {run} --data {data} --out {empty}", "argument --out: "),
    ("sample.py recon --run {run} --data {data} --no-quantize=no", "ignored explicit argument"),
    ("sample.py recon --run {badweights} --data {data}", "cannot load VQ-VAE weights"),
    ("sample.py recon --run {typoconfig} --data {data}", "lr must be a number"),
    ("sample.py recon --run {otherconfig} --data {data}", "cannot load VQ-VAE weights"),
    ("sample.py interp --run {otherconfig} --data {data}", "cannot load VQ-VAE weights"),
    ("sample.py interp --run {run} --data {data} --n 1", "--n must be at least 2"),
    ("sample.py interp --run {run} --data {empty}", "no usable images"),
    ("sample.py interp --run {run} --data {data} --seed 1.5", "argument --seed"),
    ("sample.py interp --run {run} --data {data} --out {empty}", "argument --out: "),
    ("sample.py interp --run {missing} --data {data}", "argument --run"),
    ("sample.py random --run {run} --temperature 0", "argument --temperature: must be > 0"),
    ("sample.py random --run {run} --temperature -1", "argument --temperature"),
    ("sample.py random --run {run} --top-k 0", "argument --top-k"),
    ("sample.py random --run {run} --top-k 9", "--top-k must be at most num_codes = 8"),
    ("sample.py random --run {run} --n 0", "argument --n"),
    ("sample.py random --run {run} --top-p 0", "argument --top-p: must be in (0, 1]"),
    ("sample.py random --run {run} --top-p 1.5", "argument --top-p: must be in (0, 1]"),
    ("sample.py random --run {run} --top-p half", "argument --top-p"),
    ("sample.py random --run {run} --seed x", "argument --seed"),
    ("sample.py random --run {run} --out {empty}", "argument --out: "),
    ("sample.py random --run {run} --codes-out {empty}", "argument --codes-out: "),
    ("sample.py random --run {run} --codes-out codes.txt", "argument --codes-out: codes.txt must end in .npy"),
    ("sample.py random --run {noprior}", "has no trained prior"),
    ("sample.py random --run {run} --class red", "--class: the prior of"),
    ("sample.py random --run {run} --n 1 --class red --class blue", "--class given 2 times, but the grid has only 1 rows"),
    ("sample.py random --run {run} --class", "argument --class: expected one argument"),
    ("sample.py random --run {badprior}", "cannot load prior weights"),
    ("sample.py random --run {file}", "argument --run"),
    ("sample.py random --run {run} --data {data}", "unrecognized arguments"),
    ("sample.py usage --run {run} --data {missing}", "argument --data: no such folder"),
    ("sample.py usage --run {run} --data {empty}", "no usable images"),
    ("sample.py usage --run {file} --data {data}", "argument --run"),
    ("sample.py usage --run {run} --data {data} --out {empty}", "argument --out: "),
    ("sample.py usage --run {badweights} --data {data}", "cannot load VQ-VAE weights"),
    ("sample.py evaluate --run {missing} --data {data}", "argument --run: no such folder"),
    ("sample.py evaluate --run {empty} --data {data}", "no config at"),
    ("sample.py evaluate --run {run} --data {missing}", "argument --data: no such folder"),
    ("sample.py evaluate --run {run} --data {file}", "argument --data: not a folder"),
    ("sample.py evaluate --run {run} --data {noimages}", "no usable images"),
    ("sample.py evaluate --run {run} --data {data} --fid 0", "argument --fid"),
    ("sample.py evaluate --run {run} --data {data} --fid 1", "--fid needs at least 2"),
    ("sample.py evaluate --run {run} --data {data} --batch-size 0", "argument --batch-size"),
    ("sample.py evaluate --run {run} --data {data} --json {empty}", "argument --json: "),
    ("sample.py evaluate --run {run} --data {data} --json scores.txt", "argument --json: scores.txt must end in .json"),
    ("sample.py evaluate --run {run} --data {data} --fid 2 --inception-weights {missing}",
     "no Inception weights file"),
    ("sample.py evaluate --run {run} --data {data} --seed -1", "argument --seed"),
    ("sample.py evaluate --run {badweights} --data {data}", "cannot load VQ-VAE weights"),
]

SCRIPTS = {"train.py": train, "sample.py": sample}
# The least a command needs to reach its flags' checks (used by the generated NaN/inf rows).
BASE = {
    ("train.py", "vqvae"): "--data {data} --run {new}",
    ("train.py", "prior"): "--run {run} --resume",
    ("sample.py", "recon"): "--run {run} --data {data}",
    ("sample.py", "interp"): "--run {run} --data {data}",
    ("sample.py", "random"): "--run {run}",
    ("sample.py", "usage"): "--run {run} --data {data}",
    ("sample.py", "evaluate"): "--run {run} --data {data}",
}
NUMBER_TYPES = {cli.positive_int, cli.nonnegative_int, cli.seed_int, cli.count, cli.grid_size, cli.positive_float,
                cli.nonnegative_float, cli.unit_interval, cli.probability, cli.fraction}


def commands():
    """(script, command, sub-parser) of both CLIs."""
    for script, module in SCRIPTS.items():
        for action in module.build_parser()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, parser in action.choices.items():
                    yield script, command, parser


def options(parser):
    """(flag, argparse action) of every option but --help."""
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                yield flag, action


def generated_rows():
    """NaN, +inf and -inf for every numeric flag (and a float for an integer one)."""
    rows = []
    for script, command, parser in commands():
        for flag, action in options(parser):
            if action.type in NUMBER_TYPES:
                base = f"{script} {command} {BASE[script, command]}"
                for value in ("nan", "inf", "-inf"):
                    rows.append((f"{base} {flag}={value}", f"argument {flag}"))
    return rows


ALL_ROWS = ROWS + generated_rows()


def test_every_flag_has_a_row():
    covered = set()
    for line, _ in ALL_ROWS:
        words = shlex.split(line)
        if len(words) > 1:
            covered |= {(words[0], words[1], w.split("=")[0]) for w in words[2:] if w.startswith("--")}
    flags = {(script, command, flag) for script, command, parser in commands() for flag, _ in options(parser)}
    assert BASE.keys() == {(script, command) for script, command, _ in commands()}, "a command has no BASE entry"
    assert not flags - covered, f"flags with no bad-input row: {sorted(flags - covered)}"
    assert len(ROWS) > 40


def hashes(*folders):
    found = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                found[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


@pytest.fixture(scope="module")
def places(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    run = trained_run["run"]

    def broken(name, change):
        copy = str(base / name)
        shutil.copytree(run, copy)
        change(copy)
        return copy

    def write(relative, data):
        return lambda copy: open(os.path.join(copy, relative), "wb").write(data)

    def remove_prior(copy):
        for name in ("prior.weights.h5", "checkpoint/prior.npz", "codes.npy", "prior_log.csv"):
            os.remove(os.path.join(copy, name))
        for name in os.listdir(os.path.join(copy, "samples")):
            if name.startswith("prior_sample_"):
                os.remove(os.path.join(copy, "samples", name))

    def typo(copy):
        path = os.path.join(copy, "config.json")
        text = open(path).read()
        assert '"lr": 0.001' in text
        open(path, "w").write(text.replace('"lr": 0.001', '"lr": "fast"'))

    def other_config(copy):
        config = vqk.Config.load(os.path.join(copy, "config.json"))
        config.z_dim = 16
        config.save(os.path.join(copy, "config.json"))

    def bad_checkpoints(copy):
        truncate(os.path.join(copy, "checkpoint", "vqvae.npz"))
        truncate(os.path.join(copy, "checkpoint", "prior.npz"))

    file = base / "notes.txt"
    file.write_text("not a folder\n")
    noimages = base / "noimages"
    noimages.mkdir()
    (noimages / "readme.png").write_text("a text file named like an image\n")
    (base / "empty").mkdir()
    (base / "cache.npz").write_bytes(b"PK not a zip")
    fill = {
        "data": trained_run["data"], "run": broken("run", lambda copy: None), "new": str(base / "new_run"),
        "file": str(file), "missing": str(base / "missing"), "empty": str(base / "empty"),
        "noimages": str(noimages), "badcache": str(base / "cache.npz"),
        "noprior": broken("noprior", remove_prior),
        "badconfig": broken("badconfig", write("config.json", b'{"img_dim": 16,')),
        "emptyconfig": broken("emptyconfig", write("config.json", b"")),
        "typoconfig": broken("typoconfig", typo),
        "otherconfig": broken("otherconfig", other_config),
        "badweights": broken("badweights", lambda copy: truncate(os.path.join(copy, "vqvae.weights.h5"))),
        "badprior": broken("badprior", lambda copy: truncate(os.path.join(copy, "prior.weights.h5"))),
        "badckpt": broken("badckpt", bad_checkpoints),
        "badcodes": broken("badcodes", lambda copy: np.save(os.path.join(copy, "codes.npy"), np.ones((3, 4, 4)))),
        "nocodes": broken("nocodes", lambda copy: np.save(os.path.join(copy, "codes.npy"), np.zeros((0, 4, 4), np.int32))),
        "textcodes": broken("textcodes", write("codes.npy", b"1 2 3\n")),
    }
    return fill, str(base)


def check(status, stderr, fragment, line):
    lines = stderr.strip().splitlines()
    assert status == 2, f"{line}: exit {status}\n{stderr[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in stderr, f"{line}: not one line:\n{stderr[-2000:]}"
    assert fragment in lines[0], f"{line}: {lines[0]!r} lacks {fragment!r}"


@pytest.mark.parametrize("line, fragment", ALL_ROWS, ids=[line for line, _ in ALL_ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(places, line, fragment):
    fill, base = places
    words = [w.format(**fill) for w in shlex.split(line)]
    before = hashes(base)
    status, _, stderr = call_main(SCRIPTS[words[0]].main, words[1:])
    check(status, stderr, fragment, line)
    assert hashes(base) == before, f"{line} changed files"
    assert not os.path.exists(fill["new"]), f"{line} made {fill['new']}"


@pytest.mark.parametrize("line, fragment", [
    ("train.py vqvae --data {data} --run {new} --lr nan", "argument --lr"),
    ("train.py prior --run {badconfig}", "cannot read config"),
    ("sample.py random --run {badprior}", "cannot load prior weights"),
])
def test_bad_input_in_a_fresh_process(places, line, fragment):
    """The same, through the real scripts: run_main's wiring and the quiet import."""
    fill, _ = places
    result = run_cli(*[w.format(**fill) for w in shlex.split(line)], check=False)
    check(result.returncode, result.stderr, fragment, line)


# The Python API, by class: each call must raise UsageError with a one-line message.
nan, inf = float("nan"), float("inf")
API_ROWS = [
    ("load_images(data, 0)", lambda p: vqk.load_images(p["data"], 0), "img_dim must be a positive integer"),
    ("load_images(data, nan)", lambda p: vqk.load_images(p["data"], nan), "img_dim must be a positive integer"),
    ("load_images(data, '16')", lambda p: vqk.load_images(p["data"], "16"), "img_dim must be a positive integer"),
    ("load_images(file)", lambda p: vqk.load_images(p["file"], 16), "not a folder"),
    ("load_images(missing)", lambda p: vqk.load_images(p["missing"], 16), "no such folder"),
    ("load_images([])", lambda p: vqk.load_images([], 16), "no readable images"),
    ("load_images([file])", lambda p: vqk.load_images([p["file"]], 16), "no readable images"),
    ("ImageFolder(empty)", lambda p: ImageFolder(p["empty"], 16), "no usable images"),
    ("ImageFolder(data, -1)", lambda p: ImageFolder(p["data"], -1), "img_dim must be a positive integer"),
    ("Config(img_dim=15)", lambda p: vqk.Config(img_dim=15).validate(), "img_dim must be a multiple of 4"),
    ("Config(img_dim=16.0)", lambda p: vqk.Config(img_dim=16.0).validate(), "img_dim must be an integer"),
    ("Config(lr=nan)", lambda p: vqk.Config(lr=nan).validate(), "lr must be finite"),
    ("Config(lr=-1)", lambda p: vqk.Config(lr=-1).validate(), "lr must be > 0"),
    ("Config(beta=inf)", lambda p: vqk.Config(beta=inf).validate(), "beta must be finite"),
    ("Config(ema_decay=1)", lambda p: vqk.Config(ema_decay=1.0).validate(), "ema_decay must be in (0, 1)"),
    ("Config(val_split=1)", lambda p: vqk.Config(val_split=1.0).validate(), "val_split must be in [0, 1)"),
    ("Config(quantizer='x')", lambda p: vqk.Config(quantizer="x").validate(), "quantizer must be one of"),
    ("Config(seed=-1)", lambda p: vqk.Config(seed=-1).validate(), "seed must be >= 0"),
    ("Config(data=3)", lambda p: vqk.Config(data=3).validate(), "data must be a string"),
    ("Config(kmeans_init=1)", lambda p: vqk.Config(kmeans_init=1).validate(), "kmeans_init must be true or false"),
    ("Config.load(file)", lambda p: vqk.Config.load(p["file"]), "cannot read config"),
    ("Config.load(missing)", lambda p: vqk.Config.load(p["missing"]), "no config at"),
    ("build_vqvae(img_dim=15)", lambda p: vqk.build_vqvae(vqk.Config(img_dim=15)), "img_dim must be a multiple"),
    ("build_prior(prior_heads=0)", lambda p: vqk.build_prior(vqk.Config(prior_heads=0)), "prior_heads must be at least 1"),
    ("load_run(missing)", lambda p: vqk.load_run(p["missing"]), "no run directory"),
    ("load_run(empty)", lambda p: vqk.load_run(p["empty"]), "no config at"),
    ("load_run(badweights)", lambda p: vqk.load_run(p["badweights"]), "cannot load VQ-VAE weights"),
    ("load_run(badprior)", lambda p: vqk.load_run(p["badprior"]), "cannot load prior weights"),
    ("Config(prior='rnn')", lambda p: vqk.Config(prior="rnn").validate(), "prior must be one of"),
    ("Config(classes=[])", lambda p: vqk.Config(classes=[]).validate(), "classes must be a list of class names"),
    ("Config(classes='ab')", lambda p: vqk.Config(classes="ab").validate(), "classes must be a list"),
    ("Config(classes=[a, a])", lambda p: vqk.Config(classes=["a", "a"]).validate(), "must not repeat"),
]


@pytest.mark.parametrize("call, fragment", [row[1:] for row in API_ROWS], ids=[row[0] for row in API_ROWS])
def test_bad_api_arguments_raise_a_one_line_usage_error(places, call, fragment):
    fill, _ = places
    with pytest.raises(vqk.UsageError) as raised:
        call(fill)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
