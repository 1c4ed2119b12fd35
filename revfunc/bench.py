"""What reversibility costs in time and saves in memory: ``python -m revfunc.bench``.

Compares, on the same transformer-like blocks (pre-norm attention + feed-forward) and
inputs, in one process and interleaved:

- ``plain``: plain autograd on the coupling math (= 1.0);
- ``checkpoint``: ``torch.utils.checkpoint`` per block (non-reentrant);
- ``classic``: the classic ``reversible.py`` container, when found (``--classic``);
- ``revfunc``: :class:`revfunc.nn.ReversibleSequence`;
- ``plain/func.grad``, ``revfunc/func.grad``: the functional path, ``torch.func.grad`` of
  a loss over ``sequential_sequence`` / ``reversible_sequence`` with the live parameters
  from ``pure_blocks``;
- with ``--compile``, ``plain/compiled``: ``torch.compile(fullgraph=True)`` of a
  ``torch.func.grad_and_value`` step over ``sequential_sequence``, and
  ``revfunc/compiled``: the same step written with :func:`revfunc.reversible_vjp`
  (compilation time is excluded: two warm-up rounds run first).

Every method computes ``(y1, y2)`` from ``(x, x)`` and returns ``y1 + y2``, as the
classic container does. Reported per depth: fwd+bwd time ratio to plain (median over rounds of the ratio
within a round; methods run in rotated order each round),
activation bytes saved for backward (``saved_tensors_hooks``, parameters excluded; the
classic code keeps its tensors as ``ctx`` attributes, which hooks cannot see, and
torch.func refuses the hooks, so those rows show n/a) and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of a fresh worker process per
configuration, VmHWM after fwd+bwd minus VmRSS just before the forward, with
``MALLOC_MMAP_THRESHOLD_=131072``; gradients start as ``None``, as
``optimizer.zero_grad()`` leaves them, so the peak includes the new parameter
gradients, shown in the last column). CPU memory workers run before this process imports
torch, so none inherits its peak RSS.

Writes ``bench.json``, ``bench.md`` (the table with the command, date and machine, which
the docs embed) and ``bench.png`` (time ratio and memory vs depth) to ``--out``;
``--drift`` writes ``drift.json`` and ``drift.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

METHODS = ("plain", "checkpoint", "classic", "revfunc", "plain/func.grad", "revfunc/func.grad")
COMPILED = ("plain/compiled", "revfunc/compiled")
DEFAULT_CLASSIC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "reversible.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m revfunc.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--dim", type=int, default=128, help="model width d")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd per method and depth (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--classic", default=str(DEFAULT_CLASSIC), help="path of the classic reversible.py ('' to skip)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--compile", action="store_true", help="also time and measure compiled gradient steps")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    parser.add_argument("--drift", action="store_true",
                        help="instead: reconstruction drift by dtype and depth, and bf16 autocast gradient error")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "DEPTH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def methods(args) -> list:
    names = METHODS + (COMPILED if args.compile else ())
    return [m for m in names if m != "classic" or (args.classic and os.path.exists(args.classic))]


# ----------------------------------------------------------------------------- models


class Case:
    """One method at one depth: ``run()`` does one fwd+bwd (gradients allocated anew).

    ``model`` is the module for module methods (``None`` for functional ones, whose
    saved tensors ``saved_tensors_hooks`` cannot see: torch.func refuses the hooks).
    """

    def __init__(self, run, params, model=None, x=None):
        self.run, self.params, self.model, self.x = run, params, model, x

    def clear(self) -> None:
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)
            self.x.grad = None


def build(args, method: str, depth: int) -> Case:
    """The :class:`Case` of ``method`` at ``depth`` on ``x`` of shape (batch, seq, dim)."""
    import torch

    from revfunc.testing.blocks import transformer_layers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layers = transformer_layers(depth, args.dim, heads=args.heads).to(device=args.device, dtype=dtype)
    x = torch.randn(args.batch, args.seq, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    params = list(layers.parameters())
    if "/" in method:
        return Case(_functional_step(method, layers, x.detach()), params)
    model = _module(args, method, layers)

    def run():
        model(x).float().pow(2).mean().backward()

    return Case(run, params, model, x)


def _functional_step(method: str, layers, x):
    import torch

    import revfunc

    base, mode = method.split("/")
    blocks, params = revfunc.pure_blocks(layers)
    seq = revfunc.reversible_sequence if base == "revfunc" else revfunc.sequential_sequence

    def head(y1, y2):
        return (y1 + y2).float().pow(2).mean()

    def loss(p):
        return head(*seq(blocks, p, x, x))

    if mode == "func.grad":
        return lambda: torch.func.grad(loss)(params)
    params = [tuple({k: t.detach() for k, t in p.items()} for p in pair) for pair in params]
    if base == "revfunc":
        def train_step(p):
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
    method, depth = args.worker[0], int(args.worker[1])
    case = build(args, method, depth)
    case.run()  # warm-up: one-time allocations (thread pools, kernels, compilation) are not activations
    case.run()
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
    print(json.dumps({"method": method, "depth": depth, "peak_bytes": peak}))


def peak_memory(args, argv) -> dict:
    """``{(method, depth): bytes}`` from one fresh worker process per configuration.

    Two workers run at a time: peak RSS is per process, so they do not disturb each
    other's figures (only their speed, which is not measured here).
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONUNBUFFERED="1")
    configs = [(method, depth) for depth in args.depths for method in methods(args)]
    running, peaks = [], {}

    def collect(method, depth, process):
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"revfunc.bench: memory worker {method} depth {depth} failed:\n{stderr}")
        peaks[method, depth] = json.loads(stdout.strip().splitlines()[-1])["peak_bytes"]
        print(f"  memory  depth {depth:3d}  {method:18s} {peaks[method, depth] / 2**20:8.1f} MiB", flush=True)

    for method, depth in configs:
        cmd = [sys.executable, "-m", "revfunc.bench", *argv, "--worker", method, str(depth)]
        running.append((method, depth, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True)))
        if len(running) == 2:
            collect(*running.pop(0))
    for item in running:
        collect(*item)
    return peaks


def saved_bytes(case: Case):
    """Bytes of non-parameter tensors saved for backward by one forward (``None`` for the
    functional methods: torch.func refuses saved-tensor hooks)."""
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


def timings(args) -> tuple:
    """Median fwd+bwd seconds, median per-round time ratio to plain, saved bytes and
    parameter bytes per (method, depth); methods interleaved, their order rotated."""
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times, ratios, saved, grads = {}, {}, {}, {}
    for depth in args.depths:
        built = {m: build(args, m, depth) for m in methods(args)}
        grads[depth] = sum(p.numel() * p.element_size() for p in built["plain"].params)
        for m, case in built.items():
            # The classic code keeps its tensors as ctx attributes, out of the hooks' reach:
            # 0 would read as the best result, so it is n/a.
            saved[m, depth] = None if m == "classic" else saved_bytes(case)
        samples = {m: [] for m in built}
        names = list(built)
        for r in range(args.repeats + 2):
            for m in names[r % len(names):] + names[:r % len(names)]:  # rotate: no method always last
                built[m].clear()
                sync()
                start = time.perf_counter()
                built[m].run()
                sync()
                if r >= 2:
                    samples[m].append(time.perf_counter() - start)
        for m in built:
            # Ratio to plain within each round, then the median over rounds: adjacent runs
            # share the machine's state, so slow drifts in its speed cancel out.
            times[m, depth] = statistics.median(samples[m])
            ratios[m, depth] = statistics.median(t / p for t, p in zip(samples[m], samples["plain"]))
        plain = times["plain", depth]
        line = "  ".join(f"{m} {ratios[m, depth]:5.2f}x" for m in built)
        print(f"  time    depth {depth:3d}  plain {plain * 1e3:7.1f} ms  {line}", flush=True)
    return times, ratios, saved, grads


# ----------------------------------------------------------------------------- report


def report(args, times, ratios, saved, grads, peaks) -> dict:
    rows = []
    for depth in args.depths:
        for m in methods(args):
            rows.append({
                "depth": depth,
                "method": m,
                "seconds": times[m, depth],
                "time_ratio": ratios[m, depth],
                "saved_bytes": saved[m, depth],
                "saved_ratio": None if saved[m, depth] is None else saved[m, depth] / saved["plain", depth],
                "peak_bytes": peaks.get((m, depth)),
                "peak_ratio": (peaks[m, depth] / peaks["plain", depth]) if peaks and peaks["plain", depth] else None,
                "grad_bytes": grads[depth],
            })
    header = (f"{'depth':>5}  {'method':18s} {'time':>8} {'saved MiB':>10} {'saved':>7} {'peak MiB':>9} {'peak':>7}"
              f" {'of which grads':>15}")
    print("\n" + header)
    print("-" * len(header))
    for row in rows:
        ratio = "n/a" if row["peak_ratio"] is None else f"{row['peak_ratio']:6.3f}x"
        peak = "" if row["peak_bytes"] is None else (f"{row['peak_bytes'] / 2**20:9.1f} {ratio:>7} "
                                                      f"{row['grad_bytes'] / 2**20:11.1f} MiB")
        if row["saved_bytes"] is None:  # torch.func refuses saved-tensor hooks
            saved = f"{'n/a':>10} {'n/a':>7}"
        else:
            saved = f"{row['saved_bytes'] / 2**20:10.2f} {row['saved_ratio']:6.3f}x"
        print(f"{row['depth']:5d}  {row['method']:18s} {row['time_ratio']:7.3f}x {saved} {peak}")
    print("saved n/a: classic keeps tensors as ctx attributes and torch.func refuses saved-tensor hooks, so "
          "hooks cannot count them; the peak column measures every method.")
    return {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}


def _provenance(result: dict) -> str:
    machine = result.get("machine", {})
    return (f"Command: `{result['command']}`; measured {result['date']} on {machine.get('device', '?')} "
            f"({machine.get('cpus', '?')} CPUs, {machine.get('threads', '?')} torch threads), "
            f"torch {machine.get('torch', '?')}.")


def render_markdown(result: dict) -> str:
    """The main run as markdown: provenance line and one table (docs embed this file)."""
    rows = result["rows"]
    lines = [_provenance(result), "",
             "| depth | method | time / plain | plain ms | saved MiB | peak MiB | peak / plain | new grads MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    plain_ms = {r["depth"]: r["seconds"] * 1e3 for r in rows if r["method"] == "plain"}
    for r in rows:
        saved = "n/a" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 2**20:.2f}"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        ratio = "n/a" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}x"
        lines.append(f"| {r['depth']} | {r['method']} | {r['time_ratio']:.2f}x | {plain_ms[r['depth']]:.1f} | "
                     f"{saved} | {peak} | {ratio} | {r['grad_bytes'] / 2**20:.1f} |")
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
    rows = result["rows"]
    names = list(dict.fromkeys(r["method"] for r in rows))
    has_peak = any(r["peak_bytes"] is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if has_peak else 2, figsize=(15 if has_peak else 10, 4))
    panels = [("time_ratio", "fwd+bwd time / plain"), ("saved_bytes", "activation MiB saved for backward")]
    if has_peak:
        panels.append(("peak_bytes", "peak memory MiB"))
    for ax, (key, label) in zip(axes, panels):
        for name in names:
            pts = [(r["depth"], r[key]) for r in rows if r["method"] == name and r[key] is not None]
            scale = 1.0 if key == "time_ratio" else 2**-20
            ax.plot([d for d, _ in pts], [v * scale for _, v in pts], marker="o", label=name)
        if key == "peak_bytes":
            depths = sorted({r["depth"] for r in rows})
            grads = {r["depth"]: r["grad_bytes"] for r in rows}
            ax.plot(depths, [grads[d] * scale for d in depths], "k--", label="parameter gradients")
            ax.legend()
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    cfg = result["config"]
    fig.suptitle(f"revfunc.bench: d={cfg['dim']}, seq={cfg['seq']}, batch={cfg['batch']}, "
                 f"{cfg['dtype']} on {cfg['device']}")
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
    print(f"revfunc.bench: depths {args.depths}, d={args.dim}, seq={args.seq}, batch={args.batch}, "
          f"{args.dtype} on {args.device}; methods {methods(args)}", flush=True)
    peaks = {}
    if not args.no_memory:  # before this process imports torch (workers inherit nothing)
        peaks = peak_memory(args, argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    times, ratios, saved, grads = timings(args)
    result = report(args, times, ratios, saved, grads, peaks)
    result.update(command=command, date=date, machine=_machine(args))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(render_markdown(result))
    wrote_plot = plot(result, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}" + (f" and {out / 'bench.png'}" if wrote_plot else ""))
    return result


if __name__ == "__main__":
    main()
