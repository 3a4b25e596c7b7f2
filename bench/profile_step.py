"""Where the time of one VQ-VAE training step goes, op by op, on the Keras and the PyTorch side.

    python bench/profile_step.py keras --img-dim 32 --z-dim 32            # TF ops (oneDNN kernels), no XLA
    python bench/profile_step.py keras-xla --img-dim 32 --z-dim 128       # XLA's thunks, mapped to TF ops
    python bench/profile_step.py torch --img-dim 128 --z-dim 128 --steps 2
    python bench/profile_step.py torch --onednn                           # oneDNN primitives (also keras)
    python bench/profile_step.py keras --precision mixed_bfloat16

Same batch of 64 uniform images, same model as bench/train_speed.py (TorchVQVAE for PyTorch), a few
warm-up steps, then --steps steps under the profiler. Prints the wall time per step and, per step,
the time spent in each kind of work (summed over the threads that ran it, so it can exceed the wall
time on 2 cores): convolutions (forward, input gradient, filter gradient), transposed convolutions
(forward, and their two gradients), batch norms, the quantizer, the loss, the optimizer, the rest;
"framework" is the executor's own time around the kernels (per-op overhead), "idle" the wall
time no op ran on any of the threads. Then the --top heaviest single ops.

Keras: tf.profiler.experimental's trace, read from its xplane.pb. Without XLA the events are TF ops
("gradient_tape/.../Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter"); with XLA they are thunks
(convolution.3, fusion.12), which are mapped to the TF op they came from through XLA's HLO dump
(the op_name metadata of each instruction). PyTorch: torch.profiler, the self time of each aten op.
--onednn instead runs the step with ONEDNN_VERBOSE=1 (a subprocess) and sums oneDNN's own times per
primitive (convolution / deconvolution, forward / backward_data / backward_weights, batch norm):
the same library on both sides, so the kernels compare directly (XLA does not call oneDNN).
Nothing is written outside a temporary folder.
"""

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# Kind of work from an op's name (TF op name or aten op / oneDNN primitive), first match wins.
KINDS = [
    ("transposed conv: input grad", r"gradient_tape/.*deconv.*/(Conv2D\b|conv2d|convolution)(?!Backprop)"),
    ("transposed conv: filter grad", r"gradient_tape/.*deconv.*Backprop ?Filter"),
    ("transposed conv: forward", r"deconv.*(conv_transpose|Conv2DBackpropInput)"),
    ("conv: input grad", r"gradient_tape/.*Conv2DBackpropInput"),
    ("conv: filter grad", r"gradient_tape/.*Conv2DBackpropFilter"),
    ("conv: filter grad", r"^convolution-window-dilated"),  # XLA: a strided conv's filter gradient, no op_name
    ("XLA layout copies", r"^transpose_copy_fusion|^copy"),
    ("XLA reduce-window (no op_name)", r"reduce-window"),
    ("conv: forward", r"(Conv2D|convolution)(?!Backprop)"),
    ("bias grad", r"BiasAddGrad"),
    ("batch norm", r"_bn|/bn\d|batch_norm|moments|batchnorm"),
    ("quantizer", r"quantizer|argmin|codebook"),
    ("loss", r"objective|mse"),
    ("optimizer", r"adam|Adam|AssignVariable|ReadVariable|iteration"),
]


def kind_of(name, kinds=None, other="other (relu, add, tanh, copies)"):
    """The first (kind, pattern) row of kinds (KINDS: TensorFlow's and XLA's op names) whose pattern
    the op name matches, else other."""
    for kind, pattern in kinds or KINDS:
        if re.search(pattern, name):
            return kind
    return other


def make_batch(args):
    import numpy as np

    return np.random.default_rng(0).uniform(-1, 1, (args.batch, args.img_dim, args.img_dim, 3)).astype("float32")


def keras_step(args):
    import keras

    import vq_vae_keras as vqk
    from vq_vae_keras.models import compile_vqvae

    config = vqk.Config(img_dim=args.img_dim, z_dim=args.z_dim, batch_size=args.batch, precision=args.precision,
                        jit_compile=args.side == "keras-xla")
    keras.utils.set_random_seed(0)
    model = compile_vqvae(vqk.build_vqvae(config))
    x = make_batch(args)
    return lambda: model.train_on_batch(x)


def torch_step(args):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/train_speed.py: no spinning on a shared machine
    import numpy as np
    import torch
    from train_speed import TorchVQVAE

    import vq_vae_keras as vqk

    config = vqk.Config(img_dim=args.img_dim, z_dim=args.z_dim, batch_size=args.batch)
    model = TorchVQVAE(config, bfloat16=args.precision != "float32")
    batch = torch.from_numpy(np.ascontiguousarray(make_batch(args).transpose(0, 3, 1, 2)))
    return lambda: model.train_step(batch).item()


def hlo_op_names(dump):
    """{HLO instruction name: the TF op name it came from, or its own name} from XLA's optimised
    HLO dumps (fusions without metadata keep their own name: transpose_copy_fusion.3)."""
    names = {}
    for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        for line in open(path):
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if m:
                op = re.search(r'op_name="([^"]+)"', line)
                names.setdefault(m.group(1), op.group(1) if op else m.group(1))
    return names


def keras_profile(args, step):
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="profile_step_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - start) / args.steps
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[-1], "rb").read())
    hlo = hlo_op_names(os.environ.get("PROFILE_STEP_DUMP", ""))
    ops, framework, busy = collections.Counter(), 0.0, []
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                name, ms = meta[event.metadata_id].name, event.duration_ps / 1e9 / args.steps
                if line.name == "python" and name not in hlo and name != "ThunkExecutor::Execute":
                    continue  # Python and eager bookkeeping; XLA runs some thunks on the caller's thread
                if name in ("ExecutorState::Process", "ThunkExecutor::Execute"):
                    framework += ms
                    busy.append((line.timestamp_ns * 1000 + event.offset_ps, event.duration_ps))
                elif "::" in name or name.startswith(("Executor", "tf_", "EagerExecute")):
                    continue  # runtime bookkeeping nested in the events above
                else:
                    ops[hlo[name] + f" [{name}]" if hlo.get(name, name) != name else name] += ms
    framework -= sum(ops.values())
    return wall, ops, framework, idle_ms(busy, wall * args.steps) / args.steps


def idle_ms(intervals, wall_s):
    """Wall time (ms) not covered by any of the (start_ps, duration_ps) intervals."""
    covered, end = 0, None
    for start, duration in sorted(intervals):
        stop = start + duration
        if end is None or start > end:
            covered += duration
            end = stop
        elif stop > end:
            covered += stop - end
            end = stop
    return max(0.0, wall_s * 1000 - covered / 1e9)


def torch_profile(args, step):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
    ops = collections.Counter()
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            ops[event.key] += event.self_cpu_time_total / 1000 / args.steps
    return wall, ops, 0.0, 0.0


TORCH_KINDS = [  # aten ops: a convolution's two gradients are one op (convolution_backward)
    ("conv + transposed conv: forward", r"mkldnn_convolution|slow_conv|_convolution$|conv_transpose|thnn_conv"),
    ("conv + transposed conv: input and filter grads", r"convolution_backward"),
    ("batch norm", r"batch_norm"),
    ("quantizer", r"argmin|aten::mm|addmm|index|embedding"),
    ("optimizer", r"_foreach|adam|Adam|zero_"),
]


def torch_kind(name):
    return kind_of(name, TORCH_KINDS, "other (relu, add, tanh, mse, copies, autograd)")


def onednn_profile(args):
    """Rerun this script with ONEDNN_VERBOSE=1 and sum oneDNN's times per primitive kind."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "PROFILE_STEP_QUIET": "1"}
    cmd = [sys.executable, __file__, args.side, "--img-dim", str(args.img_dim), "--z-dim", str(args.z_dim),
           "--batch", str(args.batch), "--steps", str(args.steps), "--precision", args.precision, "--mark"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True).stdout
    out = out.split("PROFILE_STEP_START", 1)[-1].split("PROFILE_STEP_END", 1)[0]
    times, shapes = collections.Counter(), collections.Counter()
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 5 and fields[0] == "onednn_verbose" and "exec" in fields:
            at = fields.index("exec")  # exec,cpu,kind,implementation,propagation,memory descriptors,...
            dtype = re.search(r"(?:src|data)[:_](\w+?):", fields[at + 5])
            kind = f"{fields[at + 2]} {fields[at + 4]} {dtype.group(1) if dtype else ''}"
            times[kind] += float(fields[-1]) / args.steps
            shapes[f"{kind} {fields[-2]} ({fields[at + 3]})"] += float(fields[-1]) / args.steps
    print(f"{args.side} {args.precision}: {args.img_dim} px, z_dim {args.z_dim}: oneDNN primitives, ms per step")
    for name, ms in times.most_common():
        print(f"  {ms:9.2f}  {name}")
    print(f"  {sum(times.values()):9.2f}  total in oneDNN\nheaviest primitives:")
    for name, ms in shapes.most_common(args.top):
        print(f"  {ms:9.2f}  {name[:150]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=["keras", "keras-xla", "torch"])
    parser.add_argument("--img-dim", type=int, default=32)
    parser.add_argument("--z-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (default 5; 2 at 128 px)")
    parser.add_argument("--precision", default="float32", help="float32 or mixed_bfloat16 (torch: bf16 autocast)")
    parser.add_argument("--top", type=int, default=12, help="single heaviest ops to list")
    parser.add_argument("--onednn", action="store_true", help="oneDNN primitive times (ONEDNN_VERBOSE=1)")
    parser.add_argument("--mark", action="store_true", help=argparse.SUPPRESS)  # the --onednn subprocess
    args = parser.parse_args()
    if args.onednn:
        return onednn_profile(args)
    if args.side == "keras-xla" and "PROFILE_STEP_DUMP" not in os.environ:  # XLA_FLAGS is read at import
        dump = tempfile.mkdtemp(prefix="profile_step_hlo_")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text"
        os.environ["PROFILE_STEP_DUMP"] = dump
    step = torch_step(args) if args.side == "torch" else keras_step(args)
    for _ in range(2 if args.img_dim > 64 else 3):
        step()
    if args.mark:
        print("PROFILE_STEP_START", flush=True)
        for _ in range(args.steps):
            step()
        print("PROFILE_STEP_END", flush=True)
        return
    wall, ops, framework, idle = (torch_profile if args.side == "torch" else keras_profile)(args, step)
    classify = torch_kind if args.side == "torch" else kind_of
    kinds = collections.Counter()
    for name, ms in ops.items():
        kinds[classify(name)] += ms
    print(f"{args.side} {args.precision}: {args.img_dim} px, z_dim {args.z_dim}, batch {args.batch}: "
          f"{1000 * wall:.1f} ms/step wall ({args.steps} profiled steps); ms per step, summed over threads:")
    for kind, ms in kinds.most_common():
        print(f"  {ms:9.2f}  {kind}")
    if args.side != "torch":
        print(f"  {framework:9.2f}  framework (executor around the ops)\n  {idle:9.2f}  idle (wall time no op ran)")
    print("heaviest ops:")
    for name, ms in ops.most_common(args.top):
        print(f"  {ms:9.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
