"""What reversibility costs in time and saves in memory: ``python -m revfunc.bench``.

Compares, on the same pre-norm blocks (causal ``F.scaled_dot_product_attention`` +
GELU feed-forward, :mod:`revfunc.testing.blocks`) and inputs, in one process and
interleaved:

- ``plain``: plain autograd on the coupling math (= 1.0);
- ``checkpoint``: ``torch.utils.checkpoint`` per block (non-reentrant);
- ``classic``: the classic ``reversible.py`` container, when found (``--classic``);
- ``revfunc``: :class:`revfunc.nn.ReversibleSequence`;
- with ``--functional``, ``plain/func.grad`` and ``revfunc/func.grad``: ``torch.func.grad``
  of a loss over ``sequential_sequence`` / ``reversible_sequence`` with the live
  parameters from ``pure_blocks``;
- with ``--compile``, every module method again as ``torch.compile(model)`` plus eager
  ``loss.backward()`` (``plain+compile``, ...), and with ``--functional`` too the compiled
  gradient steps ``plain/func.grad+compile`` (``torch.func.grad_and_value`` over
  ``sequential_sequence``) and ``revfunc/vjp+compile`` (:func:`revfunc.reversible_vjp`).
  Compilation is timed apart: the first call's time minus the steady median.

Presets (``--preset``; explicit flags override them):

- ``long`` (default): the regime reversible layers are chosen for. d=64, 4 heads, 1 x 2048
  tokens, depths 8, 16, 32; activations dominate (batch * tokens >> 6 d). Adds a
  memory-vs-sequence-length sweep at depth 8 (``--seqs``) and a memory-budget table.
- ``short``: the former default, d=128, 4 x 64 tokens, depths 4 to 32, with the
  functional methods: a quick run where parameters and one block's internals dominate.
- ``overhead``: a CPU proxy for a launch-bound accelerator step, 1 thread, depth 32,
  d=16, 2 heads, input (1, 1, 16), 15 rounds; the column to read is the extra time per
  block over plain.

Every method computes ``(y1, y2)`` from ``(x, x)`` and returns ``y1 + y2``, as the
classic container does. Reported per depth: fwd+bwd time ratio to plain (median over
rounds of the ratio within a round; methods run in rotated order each round), extra
microseconds per block over plain (median over rounds), activation bytes saved for
backward (``saved_tensors_hooks``, parameters excluded; the classic code keeps its
tensors as ``ctx`` attributes, which hooks cannot see, and torch.func and compiled
models refuse the hooks, so those rows show n/a), the total peak memory of one fwd+bwd
(CUDA: ``max_memory_allocated``; CPU: peak RSS of a fresh worker process per
configuration, one torch thread each, two at a time, VmHWM after fwd+bwd minus VmRSS
just before the forward, with ``MALLOC_MMAP_THRESHOLD_=131072``, after one warm-up
fwd+bwd), and the activation peak: the total minus the
parameter gradients it allocates (gradients start as ``None``, as
``optimizer.zero_grad()`` leaves them), also in units of one stream tensor
(batch x tokens x d elements). CPU memory workers run before this process imports
torch, so none inherits its peak RSS.

Writes ``bench.json``, ``bench.md`` (the tables with the command, date and machine, which
the docs embed) and ``bench.png`` (time ratio, total and activation peak vs depth, and
activation vs sequence length) to ``--out``; ``--drift`` writes ``drift.json`` and
``drift.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

MODULE_METHODS = ("plain", "checkpoint", "classic", "revfunc")
FUNCTIONAL_METHODS = ("plain/func.grad", "revfunc/func.grad")
COMPILED_STEPS = ("plain/func.grad+compile", "revfunc/vjp+compile")
FLOORS = ("floor/f", "floor/g")  # one branch's recomputation and vjp alone (memory only)
DEFAULT_CLASSIC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "reversible.py"
PRESETS = {
    "long": dict(depths=[8, 16, 32], dim=64, heads=4, seq=2048, batch=1, causal=True, repeats=4, warmup=1,
                 seqs=[512, 1024], sweep_depth=8, functional=False, threads=0, memory=True),
    "short": dict(depths=[4, 8, 16, 32], dim=128, heads=4, seq=64, batch=4, causal=False, repeats=7, warmup=2,
                  seqs=[], sweep_depth=8, functional=True, threads=0, memory=True),
    "overhead": dict(depths=[32], dim=16, heads=2, seq=1, batch=1, causal=False, repeats=15, warmup=2,
                     seqs=[], sweep_depth=8, functional=False, threads=1, memory=False),
}
BUDGETS_GIB = (1, 8, 80)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m revfunc.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="long", choices=sorted(PRESETS),
                        help="named configuration (default long); the flags below override it")
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--dim", type=int, help="model width d")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--seq", type=int, help="tokens per example")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None, help="causal attention")
    parser.add_argument("--seqs", type=int, nargs="*",
                        help="extra sequence lengths for the memory sweep at --sweep-depth (none: no sweep)")
    parser.add_argument("--sweep-depth", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast around the forward")
    parser.add_argument("--repeats", type=int, help="timed fwd+bwd per method and depth")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--classic", default=str(DEFAULT_CLASSIC), help="path of the classic reversible.py ('' to skip)")
    parser.add_argument("--functional", action=argparse.BooleanOptionalAction, default=None,
                        help="also the torch.func.grad paths")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--compile", action="store_true",
                        help="also every method as torch.compile(model) plus eager backward")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md and bench.png")
    parser.add_argument("--drift", action="store_true",
                        help="instead: reconstruction drift by dtype and depth, and bf16 autocast gradient error")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DEPTH", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if key == "memory":
            args.no_memory = args.no_memory or not value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    return args


def methods(args) -> list:
    names = list(MODULE_METHODS) + (list(FUNCTIONAL_METHODS) if args.functional else [])
    if args.compile:
        names += [m + "+compile" for m in MODULE_METHODS] + (list(COMPILED_STEPS) if args.functional else [])
    has_classic = bool(args.classic) and os.path.exists(args.classic)
    return [m for m in names if has_classic or not m.startswith("classic")]


def _autocast(args):
    import torch

    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(torch.device(args.device).type, dtype=dtype)


# ----------------------------------------------------------------------------- models


class Case:
    """One method at one depth: ``run()`` does one fwd+bwd (gradients allocated anew).

    ``model`` is the module for eager module methods (``None`` for functional and
    compiled ones, whose saved tensors ``saved_tensors_hooks`` cannot count).
    """

    def __init__(self, run, params, model=None, x=None):
        self.run, self.params, self.model, self.x = run, params, model, x

    def clear(self) -> None:
        for p in self.params:
            p.grad = None
        if self.x is not None:
            self.x.grad = None


def build(args, method: str, depth: int, seq: int = None) -> Case:
    """The :class:`Case` of ``method`` at ``depth`` on ``x`` of shape (batch, seq, dim)."""
    import torch

    from revfunc.testing.blocks import transformer_layers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layers = transformer_layers(depth, args.dim, heads=args.heads, causal=args.causal)
    layers = layers.to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch, seq or args.seq, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    params = list(layers.parameters())
    if method.startswith("floor/"):
        return _floor_case(args, method, layers, x.detach())
    if "/" in method:
        return Case(_functional_step(args, method, layers, x.detach()), params)
    base, compiled = method.partition("+")[::2]
    model = _module(args, base, layers)
    forward = torch.compile(model) if compiled else model

    def run():
        with _autocast(args):
            y = forward(x)
        y.float().pow(2).mean().backward()

    return Case(run, params, None if compiled else model, x)


def _floor_case(args, method: str, layers, x) -> Case:
    """One branch's recomputation and vjp alone, in plain autograd: ``floor/f`` is block 0's
    attention, ``floor/g`` its feed-forward. No reversible backward can hold less than
    this (plus the stream state it carries), so it is the reference for revfunc's peak."""
    import torch

    branch = layers[0][0 if method == "floor/f" else 1]
    params = list(branch.parameters())
    cotangent = torch.randn_like(x)

    def run():
        with _autocast(args):
            xin = x.detach().requires_grad_()
            out = branch(xin)
        torch.autograd.grad(out, [xin, *params], cotangent.to(out.dtype))

    return Case(run, params)


def _functional_step(args, method: str, layers, x):
    import torch

    import revfunc

    base, mode = method.split("/")
    blocks, params = revfunc.pure_blocks(layers)
    seq = revfunc.reversible_sequence if base == "revfunc" else revfunc.sequential_sequence

    def head(y1, y2):
        return (y1 + y2).float().pow(2).mean()

    def loss(p):
        with _autocast(args):
            y1, y2 = seq(blocks, p, x, x)
        return head(y1, y2)

    if mode == "func.grad":
        return lambda: torch.func.grad(loss)(params)
    params = [tuple({k: t.detach() for k, t in p.items()} for p in pair) for pair in params]
    if base == "revfunc":
        def train_step(p):
            with _autocast(args):
                (y1, y2), pullback = revfunc.reversible_vjp(blocks, p, x, x)
            (dy1, dy2), value = torch.func.grad_and_value(head, argnums=(0, 1))(y1, y2)
            return pullback(dy1, dy2)[0], value
    else:
        def train_step(p):
            return torch.func.grad_and_value(loss)(p)
    # Inductor's locality reordering hoists recomputation out of the reverse sweep (the
    # README's setting; torch.compile(options=...) does not turn it off).
    import torch._inductor.config

    torch._inductor.config.reorder_for_locality = False
    compiled = torch.compile(train_step, fullgraph=True)
    return lambda: compiled(params)


def _module(args, method: str, layers):
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    if method == "revfunc":
        from revfunc.nn import ReversibleSequence

        return ReversibleSequence(layers)
    if method == "classic":
        import importlib.util

        spec = importlib.util.spec_from_file_location("classic_reversible", args.classic)
        classic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(classic)
        return classic.ReversibleSequence(layers)

    def couple(x1, x2, f, g):
        y1 = x1 + f(x2)
        return y1, x2 + g(y1)

    class Coupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            x1, x2 = x, x
            for f, g in self.layers:
                if method == "checkpoint":
                    x1, x2 = checkpoint(couple, x1, x2, f, g, use_reentrant=False)
                else:
                    x1, x2 = couple(x1, x2, f, g)
            return x1 + x2

    return Coupled()


# ----------------------------------------------------------------------------- measurements


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"revfunc.bench: /proc/self/status has no {field}")


def worker(args) -> None:
    """Peak memory of one fwd+bwd in this fresh process; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # two workers share the cores: no oversubscription
    method, depth, seq = args.worker[0], int(args.worker[1]), int(args.worker[2])
    case = build(args, method, depth, seq)
    case.run()  # warm-up: one-time allocations (thread pools, kernels, compilation) are not activations
    case.clear()  # as optimizer.zero_grad() leaves it: gradients count
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case.run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        before = _status_kib("VmRSS")
        case.run()
        peak = (_status_kib("VmHWM") - before) * 1024
    grads = sum(p.numel() * p.element_size() for p in case.params)
    print(json.dumps({"method": method, "depth": depth, "seq": seq, "peak_bytes": peak, "grad_bytes": grads}))


def memory_configs(args) -> list:
    """``(method, depth, seq)`` to measure: every depth at ``--seq``, then the sweep."""
    configs = [(m, d, args.seq) for d in args.depths for m in methods(args)]
    configs += [(m, 1, args.seq) for m in FLOORS]
    for seq in sorted(set(args.seqs) | ({args.seq} if args.seqs else set())):
        configs += [(m, args.sweep_depth, seq) for m in methods(args) if (m, args.sweep_depth, seq) not in configs]
    return configs


def peak_memory(args, argv) -> dict:
    """``{(method, depth, seq): peak bytes}`` from one fresh worker process per configuration,
    and ``{floor method: activation bytes}`` of the one-branch references.

    On CPU two workers run at a time: peak RSS is per process, so they do not disturb
    each other's figures (only their speed, which is not measured here).
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONUNBUFFERED="1")
    configs = memory_configs(args)
    running, peaks, floors = [], {}, {}
    parallel = 1 if args.device.startswith("cuda") else 2

    def collect(method, depth, seq, process):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"revfunc.bench: memory worker {method} depth {depth} seq {seq} failed:\n{stderr}")
        record = json.loads(stdout.strip().splitlines()[-1])
        peaks[method, depth, seq] = record["peak_bytes"]
        if method in FLOORS:  # the branch's own parameter gradients are not activations
            floors[method] = _activation(record["peak_bytes"], record["grad_bytes"])
        print(f"  memory  [{len(peaks):2d}/{len(configs)}] depth {depth:3d}  seq {seq:5d}  {method:24s} "
              f"{peaks[method, depth, seq] / 2**20:8.1f} MiB", flush=True)

    for method, depth, seq in configs:
        cmd = [sys.executable, "-m", "revfunc.bench", *argv, "--worker", method, str(depth), str(seq)]
        running.append((method, depth, seq, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                             stderr=subprocess.PIPE, text=True)))
        if len(running) == parallel:
            collect(*running.pop(0))
    for item in running:
        collect(*item)
    return peaks, floors


def saved_bytes(case: Case):
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


def timings(args) -> dict:
    """Per (method, depth): median fwd+bwd seconds, median per-round ratio to plain, median
    extra seconds per block over plain, compile seconds, saved bytes, parameter bytes.
    Methods interleaved, their order rotated each round."""
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    out = {}
    for depth in args.depths:
        built = {m: build(args, m, depth) for m in methods(args)}
        grads = sum(p.numel() * p.element_size() for p in built["plain"].params)
        # The classic code keeps its tensors as ctx attributes, out of the hooks' reach:
        # 0 would read as the best result, so it is n/a.
        saved = {m: None if m == "classic" else saved_bytes(case) for m, case in built.items()}
        samples, first = {m: [] for m in built}, {}
        names = list(built)
        for r in range(args.repeats + args.warmup):
            for m in names[r % len(names):] + names[:r % len(names)]:  # rotate: no method always last
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
                "extra_us_per_block": statistics.median((t - p) / depth * 1e6
                                                        for t, p in zip(samples[m], samples["plain"])),
                "compile_seconds": first[m] - median if "+compile" in m else None,
                "saved_bytes": saved[m],
                "grad_bytes": grads,
            }
        line = "  ".join(f"{m} {out[m, depth]['time_ratio']:5.2f}x" for m in built)
        print(f"  time    depth {depth:3d}  plain {out['plain', depth]['seconds'] * 1e3:8.1f} ms  {line}", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def _stream_bytes(args, seq: int) -> int:
    return args.batch * seq * args.dim * {"float32": 4, "float64": 8, "bfloat16": 2}[args.dtype]


def _activation(peak, grads):
    return None if peak is None else max(peak - grads, 0)


def budget_table(args, rows, sweep) -> dict:
    """Longest sequence and deepest stack per method within each memory budget.

    Fit per method, by least squares over every measured point (the depth sweep at
    ``--seq`` and the sequence sweep at ``--sweep-depth``), the activation peak as
    ``act(depth, n) = n * (u + w * depth) + k``: O(n) per token (SDPA never
    materializes the n x n matrix), ``w`` what a method stores per block and token;
    ``w`` is clamped at 0. (A model with a separate per-block term cannot be fitted:
    the two sweeps cross at one point, so ``n * depth`` and ``depth`` are not
    separable.) A training step fits in a budget when the parameters, their gradients
    and ``act`` do (optimizer state excluded: Adam adds twice the parameters). Longest
    sequence: at the deepest measured depth, the ``n`` where that sum meets the budget.
    Deepest stack: at ``--seq``, the depth where it does, parameters growing by one
    block's bytes per block. Where the peak comes before all gradients exist (the
    reversible methods peak in the last block's backward), the activation falls with
    depth, ``w`` clamps at 0 and the fit overestimates deep stacks: conservative; the
    largest relative residual is reported.
    """
    import torch

    per_block = rows[0]["grad_bytes"] / rows[0]["depth"]  # parameter bytes of one block
    deepest = max(args.depths)
    table = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = list({(r["depth"], r["seq"]): (r["depth"], r["seq"], r["activation_bytes"]) for r in rows + sweep
                    if r["method"] == m and r["activation_bytes"] is not None}.values())
        if len(pts) < 2:
            continue
        a = torch.tensor([[n, n * d, 1.0] for d, n, _ in pts], dtype=torch.float64)
        b = torch.tensor([[float(v)] for _, _, v in pts], dtype=torch.float64)
        u, w, k = torch.linalg.lstsq(a, b, driver="gelsd").solution.flatten().tolist()
        if w < 0:  # refit without the per-block term
            w = 0.0
            u, k = torch.linalg.lstsq(a[:, [0, 2]], b, driver="gelsd").solution.flatten().tolist()
        fit = [n * (u + w * d) + k for d, n, _ in pts]
        worst = max(abs(f - v) / max(v, 1) for f, (_, _, v) in zip(fit, pts))
        entry = {"u": u, "w": w, "k": k, "max_relative_residual": worst, "budgets": {}}
        for gib in BUDGETS_GIB:
            budget = gib * 2**30
            # None: the fit has no positive slope in that direction (nothing to extrapolate).
            room = budget - 2 * per_block * deepest - k
            per_token = u + w * deepest
            seq_max = max(int(room / per_token), 0) if per_token > 0 else None
            per_depth = w * args.seq + 2 * per_block
            room = budget - u * args.seq - k
            depth_max = max(int(room / per_depth), 0) if per_depth > 0 else None
            entry["budgets"][str(gib)] = {"longest_seq": seq_max, "deepest": depth_max}
        table[m] = entry
    return table


def _summary(args, rows) -> dict:
    """The ratios the issues set targets on, from this run."""
    by = {(r["method"], r["depth"]): r for r in rows}
    lo, hi = min(args.depths), max(args.depths)
    out = {}
    if ("revfunc", hi) not in by:
        return out
    rev = by["revfunc", hi]

    def ratio(a, b):
        return None if a is None or not b else a / b

    for other in ("checkpoint", "classic", "plain"):
        if (other, hi) in by:
            o = by[other, hi]
            out[f"revfunc/{other} time"] = ratio(rev["time_ratio"], o["time_ratio"])
            out[f"revfunc/{other} activation"] = ratio(rev["activation_bytes"], o["activation_bytes"])
            if other != "plain":
                out[f"revfunc/{other} extra per block"] = ratio(rev["extra_us_per_block"], o["extra_us_per_block"])
    out[f"revfunc activation depth {hi}/{lo}"] = ratio(rev["activation_bytes"], by["revfunc", lo]["activation_bytes"])
    out["revfunc activation in stream tensors"] = rev["activation_streams"]
    if ("revfunc+compile", hi) in by and ("checkpoint+compile", hi) in by:
        out["revfunc+compile/checkpoint+compile time"] = ratio(by["revfunc+compile", hi]["seconds"],
                                                               by["checkpoint+compile", hi]["seconds"])
    return {k: v for k, v in out.items() if v is not None and (lo != hi or "depth" not in k)}


def report(args, timed, peaks, floors=None) -> dict:
    rows, sweep = [], []
    for depth in args.depths:
        for m in methods(args):
            t = timed[m, depth]
            peak = peaks.get((m, depth, args.seq))
            act = _activation(peak, t["grad_bytes"])
            rows.append({
                "depth": depth, "seq": args.seq, "method": m, **t,
                "saved_ratio": None if t["saved_bytes"] is None else t["saved_bytes"] / timed["plain", depth]["saved_bytes"],
                "peak_bytes": peak,
                "activation_bytes": act,
                "activation_streams": None if act is None else act / _stream_bytes(args, args.seq),
            })
    per_block = timed["plain", args.depths[0]]["grad_bytes"] / args.depths[0]  # parameter bytes per block
    for n in sorted(set(args.seqs) | {args.seq}) if args.seqs else ():
        for m in methods(args):
            peak = peaks.get((m, args.sweep_depth, n))
            act = _activation(peak, per_block * args.sweep_depth)
            if act is not None:
                sweep.append({"depth": args.sweep_depth, "seq": n, "method": m, "peak_bytes": peak,
                              "activation_bytes": act, "activation_streams": act / _stream_bytes(args, n)})
    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows, "sweep": sweep}
    if floors:
        result["floor"] = {m: {"activation_bytes": v, "activation_streams": v / _stream_bytes(args, args.seq)}
                           for m, v in floors.items()}
    if peaks and sweep and len(args.depths) > 1:  # both directions measured: the fit is determined
        result["budgets"] = budget_table(args, rows, sweep)
    result["summary"] = _summary(args, rows)
    print("\n" + render_tables(result))
    return result


def _mib(v, digits=1):
    return "n/a" if v is None else f"{v / 2**20:.{digits}f}"


def _provenance(result: dict) -> str:
    machine = result.get("machine", {})
    return (f"Command: `{result['command']}`; measured {result['date']} on {machine.get('device', '?')} "
            f"({machine.get('cpus', '?')} CPUs, {machine.get('threads', '?')} torch threads), "
            f"torch {machine.get('torch', '?')}.")


def _case_line(cfg: dict) -> str:
    amp = f", {cfg['amp']} autocast" if cfg.get("amp") else ""
    return (f"d={cfg['dim']}, {cfg['heads']} heads, batch {cfg['batch']} x {cfg['seq']} tokens, "
            f"{'causal ' if cfg.get('causal') else ''}SDPA attention + feed-forward, {cfg['dtype']}{amp} on "
            f"{cfg['device']}; {cfg['repeats']} timed rounds after {cfg['warmup']} warm-up; one stream tensor = "
            f"{cfg['batch'] * cfg['seq'] * cfg['dim']} elements.")


def render_tables(result: dict) -> str:
    """The run's tables as markdown (no provenance line)."""
    rows, cfg = result["rows"], result["config"]
    compiled = any(r["compile_seconds"] is not None for r in rows)
    lines = [_case_line(cfg), "",
             "| depth | method | time / plain | plain ms | extra µs / block | saved MiB | peak MiB | activation MiB "
             "| activation / plain | activation, stream tensors |" + (" compile s |" if compiled else ""),
             "| --- " * (10 + compiled) + "|"]
    plain = {r["depth"]: r for r in rows if r["method"] == "plain"}
    for r in rows:
        p = plain[r["depth"]]
        act_ratio = "n/a" if r["activation_bytes"] is None or not p["activation_bytes"] else \
            f"{r['activation_bytes'] / p['activation_bytes']:.3f}x"
        streams = "n/a" if r["activation_streams"] is None else f"{r['activation_streams']:.1f}"
        line = (f"| {r['depth']} | {r['method']} | {r['time_ratio']:.2f}x | {p['seconds'] * 1e3:.1f} | "
                f"{r['extra_us_per_block']:.0f} | {_mib(r['saved_bytes'], 2)} | {_mib(r['peak_bytes'])} | "
                f"{_mib(r['activation_bytes'])} | {act_ratio} | {streams} |")
        if compiled:
            line += " - |" if r["compile_seconds"] is None else f" {r['compile_seconds']:.1f} |"
        lines.append(line)
    if result.get("floor"):
        f, g = (result["floor"].get(m) for m in FLOORS)
        lines.append(f"\nOne branch's own recomputation and vjp, alone in plain autograd (the floor of any "
                     f"reversible backward, before the stream state it carries): attention "
                     f"{_mib(f['activation_bytes'])} MiB ({f['activation_streams']:.1f} stream tensors), "
                     f"feed-forward {_mib(g['activation_bytes'])} MiB ({g['activation_streams']:.1f}).")
    lines.append(f"\nParameter gradients (in every peak, not in the activation): "
                 + ", ".join(f"{_mib(p['grad_bytes'])} MiB at depth {d}" for d, p in plain.items()) + ".")
    if result.get("sweep"):
        seqs = sorted({r["seq"] for r in result["sweep"]})
        names = list(dict.fromkeys(r["method"] for r in result["sweep"]))
        by = {(r["method"], r["seq"]): r for r in result["sweep"]}
        lines += ["", f"Activation MiB by sequence length at depth {result['sweep'][0]['depth']} "
                      f"(batch {cfg['batch']}):", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in seqs) + " |", "| --- |" + " --- |" * len(seqs)]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(_mib(by[m, n]["activation_bytes"]) if (m, n) in by else "-"
                                                  for n in seqs) + " |")
    if result.get("budgets"):
        deepest = max(r["depth"] for r in rows)
        lines += ["", f"What fits in a memory budget (parameters + gradients + activation peak; optimizer state "
                      f"excluded), from a least-squares fit of act = n (u + w depth) + k to the points above (w >= 0; "
                      f"see budget_table in revfunc/bench.py): longest sequence (batch {cfg['batch']}) at depth "
                      f"{deepest}, and deepest stack at {cfg['seq']} tokens.", "",
                  "| method | " + " | ".join(f"{g} GiB: tokens / depth" for g in BUDGETS_GIB) + " | fit residual |",
                  "| --- |" + " --- |" * (len(BUDGETS_GIB) + 1)]
        for m, e in result["budgets"].items():
            cells = [" / ".join("n/a" if v is None else f"{v:,}" for v in e["budgets"][str(g)].values())
                     for g in BUDGETS_GIB]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {e['max_relative_residual']:.0%} |")
    if result.get("summary"):
        lines += ["", "Ratios at the deepest depth (this run): " + "; ".join(
            f"{k} {v:.2f}" for k, v in result["summary"].items()) + "."]
    return "\n".join(lines) + "\n"


def render_markdown(result: dict) -> str:
    """The main run as markdown: provenance line and the tables (docs embed this file)."""
    return _provenance(result) + "\n\n" + render_tables(result)


def render_headline(result: dict) -> str:
    """The deepest depth of a run in one small table (the README's first screen)."""
    rows, cfg = result["rows"], result["config"]
    depth = max(r["depth"] for r in rows)
    by = {r["method"]: r for r in rows if r["depth"] == depth}
    ck = by.get("checkpoint", {}).get("activation_bytes")
    lines = [f"Depth {depth}, d={cfg['dim']}, {cfg['batch']} x {cfg['seq']} tokens, "
             f"{'causal ' if cfg.get('causal') else ''}SDPA attention + feed-forward, {cfg['dtype']} on "
             f"{result.get('machine', {}).get('device', cfg['device'])}; `{result['command']}`, "
             f"{result['date']}:", "",
             "| method | fwd+bwd time / plain | activation peak MiB | / plain | / checkpoint |",
             "| --- | --- | --- | --- | --- |"]
    plain = by["plain"]["activation_bytes"]
    for m, r in by.items():
        act = r["activation_bytes"]
        vs_plain = "n/a" if act is None or not plain else f"{act / plain:.3f}x"
        vs_ck = "n/a" if act is None or not ck else f"{act / ck:.2f}x"
        lines.append(f"| {m} | {r['time_ratio']:.2f}x | {_mib(act)} | {vs_plain} | {vs_ck} |")
    return "\n".join(lines) + "\n"


def render_drift_markdown(result: dict) -> str:
    """The drift run as markdown: drift by dtype and depth, and the autocast gradient error."""
    depths = sorted({d["depth"] for d in result["drift"]})
    dtypes = list(dict.fromkeys(d["dtype"] for d in result["drift"]))
    by = {(d["dtype"], d["depth"]): d["max_error"] for d in result["drift"]}
    lines = [_provenance(result), "", "| dtype | " + " | ".join(f"depth {n}" for n in depths) + " |",
             "| --- |" + " --- |" * len(depths)]
    for t in dtypes:
        lines.append(f"| {t.replace('torch.', '')} | " + " | ".join(f"{by[t, n]:.1e}" for n in depths) + " |")
    lines += ["", "| checkpoint_every | bf16 autocast gradient error | stream tensors saved |", "| --- | --- | --- |"]
    for a in result["autocast"]:
        lines.append(f"| {a['checkpoint_every']} | {a['grad_error']:.1e} | {a['saved_stream_tensors']} |")
    if "classic_autocast_grad_error" in result:
        lines.append(f"| classic `reversible.py` | {result['classic_autocast_grad_error']:.1e} | - |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _machine(args) -> dict:
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": device}


def plot(result: dict, path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("revfunc.bench: matplotlib is not installed; skipping the plot (pip install 'revfunc[bench]')")
        return False
    rows, sweep = result["rows"], result.get("sweep") or []
    names = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("depth", rows, "time_ratio", "fwd+bwd time / plain")]
    if any(r["peak_bytes"] is not None for r in rows):
        panels += [("depth", rows, "peak_bytes", "total peak MiB"), ("depth", rows, "activation_bytes",
                                                                       "activation peak MiB (total - grads)")]
    if sweep:
        panels.append(("seq", sweep, "activation_bytes", f"activation peak MiB at depth {sweep[0]['depth']}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (xkey, data, key, label) in zip(axes[0], panels):
        scale = 1.0 if key == "time_ratio" else 2**-20
        positive = True
        for name in names:
            pts = [(r[xkey], r[key]) for r in data if r["method"] == name and r[key] is not None]
            positive = positive and all(v > 0 for _, v in pts)
            if pts:
                ax.plot([a for a, _ in pts], [v * scale for _, v in pts], marker="o", label=name)
        if key == "peak_bytes":
            depths = sorted({r["depth"] for r in rows})
            grads = {r["depth"]: r["grad_bytes"] for r in rows}
            ax.plot(depths, [grads[d] * scale for d in depths], "k--", label="parameter gradients")
        ax.set_xlabel("depth (blocks)" if xkey == "depth" else "tokens per example")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        if key != "time_ratio" and positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(f"revfunc.bench --preset {cfg['preset']}: d={cfg['dim']}, seq={cfg['seq']}, batch={cfg['batch']}, "
                 f"{cfg['dtype']}{' ' + cfg['amp'] + ' autocast' if cfg.get('amp') else ''} on {cfg['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def drift(args) -> dict:
    """Reconstruction drift by dtype and depth, and bf16 autocast gradient error vs k.

    Drift: max over blocks of :func:`revfunc.reconstruction_error` on the benchmark's
    blocks with weights and inputs in each dtype. Gradients: relative norm error of all
    parameter gradients under ``torch.autocast(dtype=bfloat16)`` against plain autograd
    (``sequential_sequence``) under the same autocast, for ``checkpoint_every`` k.
    """
    import torch

    import revfunc
    from revfunc.testing.blocks import transformer_layers

    dim, batch, seq = args.dim, args.batch, args.seq
    result = {"drift": [], "autocast": []}
    print(f"reconstruction drift (max relative error of rebuilt block inputs), d={dim}, {batch}x{seq} tokens")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for depth in (1, 8, 64):
            torch.manual_seed(0)
            layers = transformer_layers(depth, dim, heads=args.heads).to(device=args.device, dtype=dtype)
            blocks, params = revfunc.pure_blocks(layers)
            x = torch.randn(batch, seq, dim, device=args.device, dtype=dtype)
            errors = revfunc.reconstruction_error(blocks, params, x, x.clone())
            result["drift"].append({"dtype": str(dtype), "depth": depth, "max_error": max(errors)})
            print(f"  {str(dtype):15s} depth {depth:3d}  max error {max(errors):.3g}", flush=True)

    torch.manual_seed(0)
    depth = 8
    layers = transformer_layers(depth, dim, heads=args.heads).to(args.device)
    blocks, params = revfunc.pure_blocks(layers)
    x = torch.randn(batch, seq, dim, device=args.device)
    flat = [t for pair in params for p in pair for t in p.values()]

    def grads(fn, **options):
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            y1, y2 = fn(blocks, params, x, x.clone(), **options)
        return torch.cat([g.flatten() for g in torch.autograd.grad((y1 + y2).float().pow(2).mean(), flat)])

    ref = grads(revfunc.sequential_sequence)
    print(f"bf16 autocast, depth {depth}: parameter-gradient error vs plain autograd under the same autocast")
    for k in (None, 4, 2, 1):
        err = ((grads(revfunc.reversible_sequence, checkpoint_every=k) - ref).norm() / ref.norm()).item()
        saved = 2 + 2 * len(range(k, depth, k)) if k else 2
        result["autocast"].append({"checkpoint_every": k, "grad_error": err, "saved_stream_tensors": saved})
        print(f"  checkpoint_every={str(k):4s}  rel error {err:.3g}  stream tensors saved {saved}", flush=True)
    if "classic" in methods(args):  # recomputes outside autocast: same model, same loss
        import importlib.util

        spec = importlib.util.spec_from_file_location("classic_reversible", args.classic)
        classic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(classic)
        model = classic.ReversibleSequence(layers)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            y = model(x.clone().requires_grad_())
        y.float().pow(2).mean().backward()
        got = torch.cat([t.grad.flatten() for t in flat])
        err = ((got - ref).norm() / ref.norm()).item()
        result["classic_autocast_grad_error"] = err
        print(f"  classic reversible.py  rel error {err:.3g}", flush=True)
    return result


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m revfunc.bench" + "".join(f" {a}" for a in argv)
    date = time.strftime("%Y-%m-%d")
    if args.drift:
        result = drift(args)
        result.update(command=command, date=date, machine=_machine(args))
        (out / "drift.json").write_text(json.dumps(result, indent=2))
        (out / "drift.md").write_text(render_drift_markdown(result))
        print(f"\nwrote {out / 'drift.json'} and {out / 'drift.md'}")
        return result
    print(f"revfunc.bench --preset {args.preset}: depths {args.depths}, d={args.dim}, seq={args.seq}, "
          f"batch={args.batch}, {args.dtype}{' ' + args.amp + ' autocast' if args.amp else ''} on {args.device}; "
          f"methods {methods(args)}", flush=True)
    peaks, floors = {}, {}
    if not args.no_memory:  # before this process imports torch (workers inherit nothing)
        peaks, floors = peak_memory(args, argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    timed = timings(args)
    result = report(args, timed, peaks, floors)
    result.update(command=command, date=date, machine=_machine(args))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(render_markdown(result))
    if peaks:
        (out / "headline.md").write_text(render_headline(result))
    wrote_plot = plot(result, out / "bench.png")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f" and {out / 'bench.png'}" if wrote_plot else ""))
    return result


if __name__ == "__main__":
    main()
