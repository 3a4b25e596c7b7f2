"""tf.distribute on 2 logical CPU devices: mirrored (with synchronized BatchNorm) computes what one
device computes on the same global batch; without it, close; the CLI trains and resumes both
stages mirrored; two local workers (multiworker) agree and survive a killed worker.

The CPU can only be split before TensorFlow starts, so every run here is a fresh process.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY_FLAGS, run_cli, write_images

# Trains the same tiny VQ-VAE on one device and mirrored over 2 CPU replicas, 3 steps each, in one
# process; prints per case the logs, the weights and, mirrored, each replica's codebook.
COMPARE = r"""
import json, sys
import numpy as np
from vq_vae_keras.distribute import make_strategy
strategy = make_strategy("mirrored", cpu_replicas=2)
import keras
import vq_vae_keras as vqk
from vq_vae_keras.callbacks import read_csv
from vq_vae_keras.io import model_variables
sys.path.insert(0, "tests")
from conftest import tiny_config

images = np.random.default_rng(0).uniform(-1, 1, (12, 16, 16, 3)).astype("float32")
# restart: more codes than a batch has positions, so codes go unused and move at every step.
cases = {"vq": {}, "ema": dict(quantizer="ema", kmeans_init=True), "restart": dict(restart_dead=1, num_codes=128),
         "unsynced": dict(sync_batchnorm=False),
         "two-levels": dict(levels=2, quantizer="ema", kmeans_init=True, restart_dead=1, top_num_codes=32)}
out = {}
for name, overrides in cases.items():
    overrides = {"sync_batchnorm": True, **overrides}
    for where, s in (("one", None), ("mirrored", strategy)):
        run = f"{sys.argv[1]}/{name}-{where}"
        keras.utils.set_random_seed(0)
        vqvae = vqk.train_vqvae(tiny_config(jit_compile=False, **overrides), run, steps=3, data=images, strategy=s)
        variables = model_variables(vqvae.train_model)
        result = {"log": read_csv(run + "/log.csv"),
                  "weights": {k: np.asarray(v).tolist() for k, v in variables.items()}}
        if s is not None:  # what each replica holds
            result["replicas"] = {k: [np.asarray(t).tolist() for t in s.experimental_local_results(v.value)]
                                  for k, v in variables.items() if not v.trainable}
        out[f"{name}-{where}"] = result
# Adam hides the scale of a gradient: one plain SGD step must match too.
from vq_vae_keras.distribute import strategy_scope
for where, s in (("one", None), ("mirrored", strategy)):
    keras.utils.set_random_seed(0)
    with strategy_scope(s):
        vqvae = vqk.build_vqvae(tiny_config(jit_compile=False, sync_batchnorm=True))
        vqvae.train_model.compile(keras.optimizers.SGD(0.5), jit_compile=False)
    out["sgd-start"] = {k: np.asarray(v).tolist() for k, v in model_variables(vqvae.train_model).items()}
    vqvae.train_model.fit(images[:4], batch_size=4, epochs=1, verbose=0, shuffle=False)
    out[f"sgd-{where}"] = {k: np.asarray(v).tolist() for k, v in model_variables(vqvae.train_model).items()}
print("RESULT" + json.dumps(out))
"""

# Conv biases right before a BatchNorm have an analytic gradient of zero: theirs is float noise,
# which Adam turns into steps of lr. They differ between any two summation orders.
BEFORE_BN = ("encoder/conv1/bias", "encoder/conv2/bias", "decoder/deconv1/bias", "top_encoder/conv/bias")
LOSSES = ("loss", "mse_x", "mse_e", "mse_z", "perplexity", "usage")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    base = tmp_path_factory.mktemp("distribute")
    result = run_cli("-c", COMPARE, str(base), timeout=1500)
    return json.loads(result.stdout.split("RESULT", 1)[1])


def relative(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.slow  # eight short trainings in one process: a minute or more
@pytest.mark.parametrize("case", ["vq", "ema", "restart", "two-levels"])
def test_mirrored_sync_batchnorm_equals_one_device(compared, case):
    one, mirrored = compared[f"{case}-one"], compared[f"{case}-mirrored"]
    assert len(one["log"]) == len(mirrored["log"]) == 3
    for row_one, row_mirrored in zip(one["log"], mirrored["log"]):
        for key in LOSSES + (("mse_e_top", "mse_z_top", "perplexity_top", "usage_top") if case == "two-levels" else ()):
            assert relative(float(row_one[key]), float(row_mirrored[key])) < 1e-4, (key, row_one, row_mirrored)
    for name, value in one["weights"].items():
        if name.endswith(BEFORE_BN):
            continue
        # atol: a tenth of one Adam step (lr 1e-3); Adam divides near-zero gradients by their own
        # size, so their float noise (another summation order) moves a weight by up to ~3e-5 here.
        np.testing.assert_allclose(mirrored["weights"][name], value, rtol=1e-4, atol=1e-4, err_msg=name)
    # Every non-trainable state (codebook under EMA, EMA sums and counts, idle steps, BatchNorm
    # statistics, seed states) is the same on both replicas.
    for name, (first, second) in mirrored["replicas"].items():
        np.testing.assert_array_equal(first, second, err_msg=name)


@pytest.mark.slow
def test_one_sgd_step_is_the_global_batch_gradient(compared):
    """The replicas' gradients are averaged, not summed (Adam would hide a factor; SGD does not)."""
    one, mirrored = compared["sgd-one"], compared["sgd-mirrored"]
    moved = max(np.abs(np.asarray(one[k]) - np.asarray(compared["sgd-start"][k])).max() for k in one)
    assert moved > 1e-3
    for name, value in one.items():
        np.testing.assert_allclose(mirrored[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_restarts_really_happened(compared):
    """The restart case moved codes (else it would test nothing beyond "vq"): the codebook starts
    in [-0.05, 0.05] and 3 Adam steps move it by 0.003 at most; moved codes are encoder outputs."""
    codebook = np.asarray(compared["restart-one"]["weights"]["vector_quantizer/codebook"])
    assert np.abs(codebook).max() > 0.2


@pytest.mark.slow
def test_mirrored_without_sync_batchnorm_is_close(compared):
    """Per-replica BatchNorm statistics (each replica normalises its own 2 images): losses differ
    from one device at this tiny batch (asserted: within 30% relative); the moving statistics
    are the same on both replicas."""
    one, mirrored = compared["unsynced-one"], compared["unsynced-mirrored"]
    first = [relative(float(one["log"][0][k]), float(mirrored["log"][0][k])) for k in ("mse_x",)]
    assert first[0] > 1e-6, "per-replica statistics should change something"
    for row_one, row_mirrored in zip(one["log"], mirrored["log"]):
        assert relative(float(row_one["mse_x"]), float(row_mirrored["mse_x"])) < 0.3
    for name, (a, b) in mirrored["replicas"].items():
        np.testing.assert_array_equal(a, b, err_msg=name)


# The logged rows themselves, `loss` included: 2 replicas against 1 device, 10 deterministic steps
# without XLA. Each case adds a loss with add_loss (the objective; the Gumbel quantizer's KL too).
LOGGED = r"""
import json, sys
import numpy as np
from vq_vae_keras.distribute import make_strategy
strategy = make_strategy("mirrored", cpu_replicas=2)
import vq_vae_keras as vqk
from vq_vae_keras.callbacks import read_csv
sys.path.insert(0, "tests")
from conftest import tiny_config

images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype("float32")
out = {}
for name, overrides in {"vq": {}, "gumbel": dict(quantizer="gumbel"),
                        "two-levels": dict(levels=2, quantizer="gumbel")}.items():
    for where, s in (("one", None), ("mirrored", strategy)):
        run = f"{sys.argv[1]}/{name}-{where}"
        config = tiny_config(jit_compile=False, sync_batchnorm=True, **overrides)
        vqk.train_vqvae(config, run, steps=10, data=images, strategy=s, deterministic=True)
        out[f"{name}-{where}"] = read_csv(run + "/log.csv")
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("case", ["vq", "gumbel", "two-levels"])
def test_mirrored_logs_the_loss_one_device_logs(logged, case):
    """Every logged value, `loss` first (NanGuard, the progress bar and EarlyStopping read it):
    it once took in the other replica's add_loss terms (+50% here)."""
    one, mirrored = logged[f"{case}-one"], logged[f"{case}-mirrored"]
    assert len(one) == len(mirrored) == 10 and "loss" in one[0]
    for row_one, row_mirrored in zip(one, mirrored):
        assert row_one.keys() == row_mirrored.keys()
        for key in row_one:
            if key not in ("step", "epoch"):
                assert relative(float(row_one[key]), float(row_mirrored[key])) < 1e-4, (key, row_one, row_mirrored)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    result = run_cli("-c", LOGGED, str(tmp_path_factory.mktemp("logged")), timeout=600)
    return json.loads(result.stdout.split("RESULT", 1)[1])


def mirrored_flags():
    return ["--distribute", "mirrored", "--cpu-replicas", "2"]


@pytest.mark.slow
def test_cli_mirrored_both_stages_train_and_resume(tmp_path):
    data = write_images(tmp_path / "images", count=12)
    run = str(tmp_path / "run")
    run_cli("train.py", "vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--steps", "3", "--sample-every", "2",
            *mirrored_flags(), "--sync-batchnorm")
    run_cli("train.py", "vqvae", "--data", data, "--run", run, "--steps", "4", "--resume", *mirrored_flags())
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["sync_batchnorm"] is True and config["jit_compile"] is False
    assert [int(r.split(",")[0]) for r in open(os.path.join(run, "log.csv")).read().split()[1:]] == [1, 2, 3, 4]
    # The prior's size is not a CLI flag: shrink it in the saved config (tests only).
    config.update(prior_heads=2, prior_head_dim=4, prior_depth=2)
    config.pop("versions")
    json.dump(config, open(os.path.join(run, "config.json"), "w"))
    run_cli("train.py", "prior", "--run", run, "--steps", "2", "--batch-size", "4", *mirrored_flags())
    run_cli("train.py", "prior", "--run", run, "--steps", "4", "--resume", *mirrored_flags())
    assert os.path.isfile(os.path.join(run, "prior.weights.h5"))
    import vq_vae_keras as vqk

    assert vqk.load_run(run).prior is not None


def test_jit_is_turned_off_under_a_strategy_only():
    from conftest import tiny_config
    from vq_vae_keras.distribute import xla_off_under

    one, several = tiny_config(jit_compile=True), tiny_config(jit_compile=True)
    xla_off_under(None, one, "jit_compile")
    xla_off_under(object(), several, "jit_compile")
    assert one.jit_compile and not several.jit_compile


# ---------------------------------------------------------------- two local workers

def free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# A worker through the Python API, then its weights into ARGV[3] (a worker other than the chief leaves
# nothing in the run directory to compare).
WORKER = r"""
import sys
import numpy as np
from vq_vae_keras.distribute import make_strategy
strategy = make_strategy("multiworker")
import vq_vae_keras as vqk
from vq_vae_keras.io import model_variables
sys.path.insert(0, "tests")
from conftest import tiny_config
data, run, out = sys.argv[1:4]
vqvae = vqk.train_vqvae(tiny_config(jit_compile=False, sync_batchnorm=True, sample_every=1), run, steps=3, data=data,
                        strategy=strategy, deterministic=True)
np.savez(out, **{k.replace("/", "."): np.asarray(v) for k, v in model_variables(vqvae.train_model).items()})
"""


def start_workers(args, ports, script="train.py"):
    """One process per worker, on 127.0.0.1 ports; args[i] may be a list per worker."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(len(ports)):
        env = {**os.environ, "PYTHONPATH": ROOT,
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        command = [script] if script == "train.py" else ["-c", script]
        worker_args = args[i] if isinstance(args[0], list) else args
        procs.append(subprocess.Popen([sys.executable, *command, *worker_args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=400):
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, err))
    return results


@pytest.mark.slow
def test_two_workers_train_one_run_and_resume_after_a_kill(tmp_path):
    data = write_images(tmp_path / "images", count=12)
    run = str(tmp_path / "run")
    args = ["vqvae", "--data", data, "--run", run, *TINY_FLAGS, "--sample-every", "1", "--sync-batchnorm",
            "--distribute", "multiworker"]
    outs = [str(tmp_path / f"worker{i}.npz") for i in range(2)]
    procs = start_workers([[data, run, out] for out in outs], free_ports(2), WORKER)
    for (code, err), i in zip(finish(procs), range(2)):
        assert code == 0, f"worker {i}: {err[-2000:]}"
    for name in ("config.json", "log.csv", "vqvae.weights.h5", "vqvae.keras", "checkpoint/vqvae.npz",
                 "samples/test_ae_2_2.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert len(os.listdir(os.path.join(run, "samples"))) == 6  # steps 1, 2, 3: one chief writing
    with np.load(outs[0]) as first, np.load(outs[1]) as second:
        assert first.files == second.files
        for name in first.files:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)

    # Kill worker 1 once the chief has checkpointed a step of the continued run; the chief then
    # waits on the dead worker's all-reduce: stop it too. Both restart with --resume and finish.
    procs = start_workers([*args, "--steps", "40", "--resume"], free_ports(2))
    log = os.path.join(run, "log.csv")
    deadline = time.time() + 300
    while time.time() < deadline and len(open(log).read().split()) < 1 + 5 and procs[0].poll() is None:
        time.sleep(0.5)
    assert procs[0].poll() is None, finish(procs)[0][1][-2000:]
    procs[1].send_signal(signal.SIGKILL)
    time.sleep(2)
    procs[0].send_signal(signal.SIGKILL)
    finish(procs, timeout=30)
    assert len(open(log).read().split()) - 1 < 8
    procs = start_workers([*args, "--steps", "8", "--resume"], free_ports(2))
    for (code, err), i in zip(finish(procs), range(2)):
        assert code == 0, f"worker {i}: {err[-2000:]}"
    steps = [int(r.split(",")[0]) for r in open(log).read().split()[1:]]
    assert steps[-1] == 8 and steps == sorted(set(steps))
