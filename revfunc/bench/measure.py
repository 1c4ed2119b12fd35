"""Measuring one training step: activation peak in a fresh process, saved bytes, time.

Activation memory is the peak during the step minus what was allocated just before it,
with the parameter gradients already allocated (zeroed, not ``None``), so nothing is
subtracted that did not exist at the peak; a step that *returns* its gradients
(``torch.func``, compiled steps, the one-branch floor) has their bytes subtracted.
CUDA: ``max_memory_allocated``. CPU: peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) minus ``VmRSS`` before it; start the
process with ``MALLOC_MMAP_THRESHOLD_=131072`` (:data:`WORKER_ENV`) so freed tensors go
back to the OS at once. ``tests/memprobe.py`` measures the memory tests' paths with
:func:`activation_bytes` too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

from revfunc.bench.cases import FLOORS, build

#: Environment of a measuring process (see the module docstring).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONUNBUFFERED": "1"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"revfunc.bench: /proc/self/status has no {field}")


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a pytree (``None`` and non-tensors count 0)."""
    import torch

    return sum(
        t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)
    )


def peak_above(step: Callable, device: str = "cpu"):
    """``(peak bytes above the level just before, step's result)`` of one call of ``step``."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status_kib("VmRSS")
    out = step()
    return (_status_kib("VmHWM") - before) * 1024, out


def activation_bytes(step: Callable, device: str = "cpu", prepare: Optional[Callable] = None):
    """Activation peak of ``step()`` after one identical warm-up call (one-off costs such as
    thread pools and compilation are not activations): the peak above the level before,
    minus the bytes of what the step returns. ``prepare`` runs before each call (e.g.
    pre-allocating gradients). Returns ``(activation bytes, returned bytes)``.

    The warm-up's result is kept alive through the measured call: freed, its memory would
    stay resident in the heap, the measured call's returned tensors would reuse it without
    raising the peak, and subtracting them would under-count (figures below zero)."""
    if prepare:
        prepare()
    warm = step()
    if prepare:
        prepare()
    peak, out = peak_above(step, device)
    returned = tensor_bytes(out)
    del warm
    return peak - returned, returned


def worker(args) -> None:
    """Activation peak of one training step in this fresh process; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # two workers share the cores: no oversubscription
    method, depth, seq = args.worker[0], int(args.worker[1]), int(args.worker[2])
    case = build(args, method, depth, seq)
    module_step = case.model is not None or "+compile" in method and "/" not in method
    activation, returned = activation_bytes(case.run, args.device, case.preallocate if module_step else case.clear)
    record = {
        "method": method,
        "depth": depth,
        "seq": seq,
        "activation_bytes": max(activation, 0),
        "grad_bytes": tensor_bytes(case.params),
    }
    if module_step and args.setups:  # the same step with the optimizer in backward (gradients freed as they arrive)
        case.clear()
        case.optimizer_in_backward()
        record["optimizer_in_backward_bytes"] = max(activation_bytes(case.run, args.device, case.clear)[0], 0)
    print(json.dumps(record))


def memory_configs(args, methods) -> list:
    """``(method, depth, seq)`` to measure: every depth at ``--seq``, the floors, then the sweep."""
    configs = [(m, d, args.seq) for d in args.depths for m in methods]
    configs += [(m, 1, args.seq) for m in FLOORS]
    for seq in sorted(set(args.seqs) | ({args.seq} if args.seqs else set())):
        configs += [(m, args.sweep_depth, seq) for m in methods if (m, args.sweep_depth, seq) not in configs]
    return configs


def peak_memory(args, argv, methods) -> dict:
    """``{(method, depth, seq): activation bytes}``, one fresh worker process per configuration.

    On CPU two workers run at a time: peak RSS is per process, so they do not disturb
    each other's figures (only their speed, which is not measured here).
    """
    env = dict(os.environ, **WORKER_ENV)
    configs = memory_configs(args, methods)
    running, activations = [], {}
    parallel = 1 if args.device.startswith("cuda") else 2

    def collect(method, depth, seq, process):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"revfunc.bench: memory worker {method} depth {depth} seq {seq} failed:\n{stderr}")
        record = json.loads(stdout.strip().splitlines()[-1])
        activations[method, depth, seq] = record["activation_bytes"]
        if "optimizer_in_backward_bytes" in record:
            activations[method, depth, seq, "optimizer_in_backward"] = record["optimizer_in_backward_bytes"]
        done = sum(len(key) == 3 for key in activations)
        print(
            f"  memory  [{done:2d}/{len(configs)}] depth {depth:3d}  seq {seq:5d}  {method:24s} "
            f"{record['activation_bytes'] / 2**20:8.1f} MiB",
            flush=True,
        )

    for method, depth, seq in configs:
        cmd = [sys.executable, "-m", "revfunc.bench", *argv, "--worker", method, str(depth), str(seq)]
        running.append(
            (
                method,
                depth,
                seq,
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            )
        )
        if len(running) == parallel:
            collect(*running.pop(0))
    for item in running:
        collect(*item)
    return activations


def saved_bytes(case) -> Optional[int]:
    """Bytes of non-parameter tensors saved for backward by one forward (``None`` for the
    functional and compiled methods: torch.func and compiled graphs refuse the hooks)."""
    import torch

    if case.model is None:
        return None
    model, x = case.model, case.x
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in skip:
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def timings(args, methods) -> dict:
    """Per (method, depth): median fwd+bwd seconds, median per-round ratio to plain, median
    extra seconds per block over plain, compile seconds, saved bytes, parameter bytes.
    Methods interleaved, their order rotated each round."""
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out = {}
    for depth in args.depths:
        built = {m: build(args, m, depth) for m in methods}
        grads = tensor_bytes(built["plain"].params)
        # The classic code keeps its tensors as ctx attributes, out of the hooks' reach:
        # 0 would read as the best result, so it is n/a.
        saved = {m: None if m == "classic" else saved_bytes(case) for m, case in built.items()}
        samples: Dict[str, list] = {m: [] for m in built}
        first: Dict[str, Any] = {}
        names = list(built)
        for r in range(args.repeats + args.warmup):
            for m in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no method always last
                built[m].clear()
                sync()
                start = time.perf_counter()
                built[m].run()
                sync()
                first.setdefault(m, time.perf_counter() - start)
                if r >= args.warmup:
                    samples[m].append(time.perf_counter() - start)
            print(f"  time    depth {depth:3d}  round {r + 1}/{args.repeats + args.warmup}", flush=True)
        for m in built:
            # Ratio to plain within each round, then the median over rounds: adjacent runs
            # share the machine's state, so slow drifts in its speed cancel out.
            median = statistics.median(samples[m])
            out[m, depth] = {
                "seconds": median,
                "time_ratio": statistics.median(t / p for t, p in zip(samples[m], samples["plain"])),
                "extra_us_per_block": statistics.median(
                    (t - p) / depth * 1e6 for t, p in zip(samples[m], samples["plain"])
                ),
                "compile_seconds": first[m] - median if "+compile" in m else None,
                "saved_bytes": saved[m],
                "grad_bytes": grads,
            }
        line = "  ".join(f"{m} {out[m, depth]['time_ratio']:5.2f}x" for m in built)
        print(f"  time    depth {depth:3d}  plain {out['plain', depth]['seconds'] * 1e3:8.1f} ms  {line}", flush=True)
    return out
