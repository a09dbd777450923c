"""The same hypergradient on several processes (hosts) with jax.distributed.

    python examples/multihost.py --processes 2 --local-devices 2 --check

This one file is both the launcher and the worker. The launcher starts N copies of
itself on this machine (loopback only: the coordinator listens on 127.0.0.1), each
with k CPU devices. Every worker

  1. calls jax.distributed.initialize (before any other JAX call), so that
     jax.devices() lists all N*k devices of all processes; on CPU the
     cross-process collectives are gloo (jax_cpu_collectives_implementation),
  2. builds one global Mesh over those devices and shards the MNIST images along
     its "data" axis (each process supplies only the rows its own devices hold),
  3. runs the same jitted program: the gradient of the validation loss of a
     784-32-10 MLP, trained 30 full-batch steps by revlearn.sgd with exact
     reversal, with respect to a per-step learning-rate schedule and a
     per-weight L2 penalty. Each training step's gradient is an all-reduce
     across all devices and processes, forwards and in the reversal.

On real hosts you run the worker yourself on each host (`--worker --process-id i
--coordinator HOST0:PORT ...`). With --check the launcher then repeats the
computation in one ordinary process (no jax.distributed, N*k host devices),
checks that training reverses exactly, and compares the hypergradients.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

STEPS, N_TRAIN, N_VALID = 30, 512, 512
TOLERANCE = 1e-12


def hypergradient(mesh):
    """(validation loss, d/d lr schedule, d/d per-weight log L2) on `mesh`; the same code on
    one process or many. Returns NumPy arrays (replicated, so every process has them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import revlearn
    from revlearn import data, models

    rows, replicated = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    # Every process reads the same deterministic subset; make_array_from_callback asks each
    # process only for the rows of its own devices (idx is a tuple of slices into the array).
    splits = data.split(data.load_mnist("embedded"), {"train": N_TRAIN, "valid": N_VALID}, seed=0)

    def sharded(a):
        a = np.asarray(a, np.float64)
        return jax.make_array_from_callback(a.shape, rows, lambda idx: a[idx])

    train = {"x": sharded(splits["train"].images), "y": sharded(splits["train"].onehot)}
    xv, yv = sharded(splits["valid"].images), sharded(splits["valid"].onehot)

    params0 = models.mlp_init(jax.random.PRNGKey(0), [784, 32, 10], dtype=jnp.float64)
    lr = [{"w": jnp.full(STEPS, 0.5), "b": jnp.full(STEPS, 0.5)} for _ in params0]
    log_l2 = jnp.full(params0[0]["w"].shape, -8.0)

    def loss_fn(params, hypers, step):     # full batch: each device its rows, then all-reduce
        penalty = jnp.sum(jnp.exp(hypers["log_l2"]) * params[0]["w"] ** 2)
        return models.nll(models.mlp_apply(params, hypers["x"]), hypers["y"]) + penalty

    # The training data travel in `hypers` (jit arguments, not closed-over constants: a global
    # array spanning several processes cannot be baked into a program). Their gradient is
    # computed and dropped; we differentiate with respect to lr and log_l2 only.
    def validation_loss(lr, log_l2, train, xv, yv):
        wT = revlearn.sgd(loss_fn, params0, {"log_l2": log_l2, **train}, lr=lr, momentum=0.9,
                          steps=STEPS, method=revlearn.Reversible(min_momentum=0.5))
        return models.nll(models.mlp_apply(wT, xv), yv)

    f = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1)), out_shardings=replicated)
    loss, (d_lr, d_l2) = f(lr, log_l2, train, xv, yv)
    d_lr = jnp.stack([d_lr[0]["w"], d_lr[0]["b"], d_lr[1]["w"], d_lr[1]["b"]])
    out = {"loss": loss, "d_lr": d_lr, "d_log_l2": d_l2}
    # Replicated outputs: every process holds a full copy, readable without a gather.
    return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}, (
        loss_fn, params0, {"log_l2": log_l2, **train}, lr)


def worker(args):
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", args.local_devices)   # k CPU devices per process
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (the default on CPU)
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                               process_id=args.process_id,
                               local_device_ids=list(range(args.local_devices)),
                               coordinator_bind_address=args.coordinator)  # loopback only
    from jax.sharding import Mesh

    devices = jax.devices()                    # all N*k devices, ordered by process
    assert len(devices) == args.processes * args.local_devices, devices
    mesh = Mesh(np.array(devices), ("data",))
    t0 = time.perf_counter()
    result, _ = hypergradient(mesh)
    if jax.process_index() == 0:
        print(f"process 0 of {jax.process_count()}: {len(devices)} devices "
              f"({jax.local_device_count()} local), hypergradient in "
              f"{time.perf_counter() - t0:.1f} s (with compilation)")
        if args.out:
            np.savez(args.out, **result)
    jax.distributed.shutdown()


def reference(n_devices):
    """The same computation in this process, without jax.distributed; also checks reversal."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", n_devices)
    from jax.sharding import Mesh

    import revlearn

    mesh = Mesh(np.array(jax.devices()), ("data",))
    result, (loss_fn, params0, hypers, lr) = hypergradient(mesh)
    check = revlearn.check_reversal(loss_fn, params0, hypers, lr=lr, momentum=0.9, steps=STEPS,
                                    method=revlearn.Reversible(min_momentum=0.5))
    return result, check


def launch(args):
    with socket.socket() as s:               # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    out = os.path.join(tmp, "process0.npz")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               "--process-id", str(i), "--processes", str(args.processes),
                               "--local-devices", str(args.local_devices),
                               "--coordinator", f"127.0.0.1:{port}", "--out", out])
             for i in range(args.processes)]
    # If one worker fails the others would wait for it in a collective: stop them all.
    deadline = time.monotonic() + args.timeout
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and not any(p.poll() for p in procs)):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers failed with exit codes {codes} (killed: -9; timeout {args.timeout:g} s)")
        return 1
    print(f"{args.processes} processes x {args.local_devices} devices: done in "
          f"{time.perf_counter() - t0:.1f} s")
    result = dict(np.load(out))
    print(f"validation loss after {STEPS} steps: {float(result['loss']):.10f}")
    print("d loss / d lr, layer 0 weights, steps 0..4:", np.round(result["d_lr"][0, :5], 6))
    print(f"d loss / d log_l2: norm {np.linalg.norm(result['d_log_l2']):.6e}")
    if not args.check:
        return 0

    n = args.processes * args.local_devices
    ref, check = reference(n)
    print(f"\nreference: one process, {n} devices, no jax.distributed")
    print(check)
    rel = max(float(np.max(np.abs(result[k] - ref[k])) / np.max(np.abs(ref[k]))) for k in ref)
    print(f"max relative difference multi-process vs single-process: {rel:.3e} "
          f"(tolerance {TOLERANCE:g})")
    ok = rel <= TOLERANCE and check.weights_exact and check.state_exact and check.buffer_empty
    print("-> PASS" if ok else "-> FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare with one process")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for workers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (workers)")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        sys.exit(launch(args))
