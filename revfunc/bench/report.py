"""The benchmark's report: rows, tables, the README headline and the plot."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Dict

from revfunc.bench.cases import FLOORS
from revfunc.bench.fit import BUDGETS_GIB, MAX_RESIDUAL, budget_table


def _stream_bytes(cfg, seq: int) -> int:
    """Bytes of one stream tensor (batch x seq x d) for a config (argparse args or a dict)."""
    get: Any = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return get("batch") * seq * get("dim") * {"float32": 4, "float64": 8, "bfloat16": 2}[get("dtype")]


def _summary(args, rows) -> dict:
    """The ratios the issues set targets on, from this run."""
    by = {(r["method"], r["depth"]): r for r in rows}
    lo, hi = min(args.depths), max(args.depths)
    out: Dict[str, Any] = {}
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
        out["revfunc+compile/checkpoint+compile time"] = ratio(
            by["revfunc+compile", hi]["seconds"], by["checkpoint+compile", hi]["seconds"]
        )
    return {k: v for k, v in out.items() if v is not None and (lo != hi or "depth" not in k)}


def report(args, methods, timed, activations) -> dict:
    """The run's result: one row per (depth, method), the sequence sweep, the floors, the
    budget fit and the summary ratios. ``activations``: ``{(method, depth, seq): bytes}``
    from :func:`revfunc.bench.measure.peak_memory` (empty: no memory columns)."""
    rows, sweep = [], []
    for depth in args.depths:
        for m in methods:
            t = timed[m, depth]
            act = activations.get((m, depth, args.seq))
            rows.append(
                {
                    "depth": depth,
                    "seq": args.seq,
                    "method": m,
                    **t,
                    "saved_ratio": None
                    if t["saved_bytes"] is None
                    else t["saved_bytes"] / timed["plain", depth]["saved_bytes"],
                    # what the step holds above the parameters: their gradients and the activations
                    "peak_bytes": None if act is None else act + t["grad_bytes"],
                    "activation_bytes": act,
                    "activation_streams": None if act is None else act / _stream_bytes(args, args.seq),
                    "optimizer_in_backward_bytes": activations.get((m, depth, args.seq, "optimizer_in_backward")),
                }
            )
    per_block = timed["plain", args.depths[0]]["grad_bytes"] / args.depths[0]  # parameter bytes per block
    for n in sorted(set(args.seqs) | {args.seq}) if args.seqs else ():
        for m in methods:
            act = activations.get((m, args.sweep_depth, n))
            if act is not None:
                sweep.append(
                    {
                        "depth": args.sweep_depth,
                        "seq": n,
                        "method": m,
                        "peak_bytes": act + per_block * args.sweep_depth,
                        "activation_bytes": act,
                        "activation_streams": act / _stream_bytes(args, n),
                    }
                )
    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows, "sweep": sweep}
    floors = {m: activations[m, 1, args.seq] for m in FLOORS if (m, 1, args.seq) in activations}
    if floors:
        result["floor"] = {
            m: {"activation_bytes": v, "activation_streams": v / _stream_bytes(args, args.seq)}
            for m, v in floors.items()
        }
    if activations and sweep and len(args.depths) > 1:  # both directions measured: the fit is determined
        result["budgets"] = budget_table(args, rows, sweep)
    result["summary"] = _summary(args, rows)
    print("\n" + render_tables(result))
    return result


def _mib(v, digits=1):
    return "n/a" if v is None else f"{v / 2**20:.{digits}f}"


def _provenance(result: dict) -> str:
    machine = result.get("machine", {})
    return (
        f"Command: `{result['command']}`; measured {result['date']} on {machine.get('device', '?')} "
        f"({machine.get('cpus', '?')} CPUs, {machine.get('threads', '?')} torch threads), "
        f"torch {machine.get('torch', '?')}."
    )


def _blocks_text(cfg: dict) -> str:
    """What the blocks are: the transformer's, or a flow's affine couplings of MLP subnets."""
    coupling = cfg.get("coupling") or "additive"
    if coupling.startswith("affine"):
        return f"{coupling} couplings of MLP subnets (hidden {4 * cfg['dim']}), the log-det in the loss"
    blocks = f"{'causal ' if cfg.get('causal') else ''}SDPA attention + feed-forward"
    return blocks if coupling == "additive" else f"{blocks}, {coupling} couplings"


def _case_line(cfg: dict) -> str:
    amp = f", {cfg['amp']} autocast" if cfg.get("amp") else ""
    heads = "" if (cfg.get("coupling") or "").startswith("affine") else f"{cfg['heads']} heads, "
    return (
        f"d={cfg['dim']}, {heads}batch {cfg['batch']} x {cfg['seq']} tokens, "
        f"{_blocks_text(cfg)}, {cfg['dtype']}{amp} on "
        f"{cfg['device']}; {cfg['repeats']} timed rounds after {cfg['warmup']} warm-up; one stream tensor = "
        f"{cfg['batch'] * cfg['seq'] * cfg['dim']} elements."
    )


def render_tables(result: dict) -> str:
    """The run's tables as markdown (no provenance line)."""
    rows, cfg = result["rows"], result["config"]
    compiled = any(r["compile_seconds"] is not None for r in rows)
    lines = [
        _case_line(cfg),
        "",
        "| depth | method | time / plain | plain ms | extra µs / block | saved MiB | peak MiB | activation MiB "
        "| activation / plain | activation, stream tensors |" + (" compile s |" if compiled else ""),
        "| --- " * (10 + compiled) + "|",
    ]
    plain = {r["depth"]: r for r in rows if r["method"] == "plain"}
    for r in rows:
        p = plain[r["depth"]]
        act_ratio = (
            "n/a"
            if r["activation_bytes"] is None or not p["activation_bytes"]
            else f"{r['activation_bytes'] / p['activation_bytes']:.3f}x"
        )
        streams = "n/a" if r["activation_streams"] is None else f"{r['activation_streams']:.1f}"
        line = (
            f"| {r['depth']} | {r['method']} | {r['time_ratio']:.2f}x | {p['seconds'] * 1e3:.1f} | "
            f"{r['extra_us_per_block']:.0f} | {_mib(r['saved_bytes'], 2)} | {_mib(r['peak_bytes'])} | "
            f"{_mib(r['activation_bytes'])} | {act_ratio} | {streams} |"
        )
        if compiled:
            line += " - |" if r["compile_seconds"] is None else f" {r['compile_seconds']:.1f} |"
        lines.append(line)
    if result.get("floor"):
        flow = (cfg.get("coupling") or "").startswith("affine")
        f, g = (result["floor"].get(m) for m in FLOORS)
        lines.append(
            f"\nOne branch's own recomputation and vjp, alone in plain autograd (the floor of any "
            f"reversible backward, before the stream state it carries): {'f' if flow else 'attention'} "
            f"{_mib(f['activation_bytes'])} MiB ({f['activation_streams']:.1f} stream tensors), "
            f"{'g' if flow else 'feed-forward'} {_mib(g['activation_bytes'])} MiB ({g['activation_streams']:.1f})."
        )
    lines.append(
        "\nParameter gradients (allocated before the step, so in the peak column and not in the "
        "activation): " + ", ".join(f"{_mib(p['grad_bytes'])} MiB at depth {d}" for d, p in plain.items()) + "."
    )
    if any(r.get("optimizer_in_backward_bytes") is not None for r in rows):
        lines += [
            "",
            (
                "Training setups (activation MiB; the peak column above adds the gradients): gradient "
                "accumulation (gradients allocated before the step, as in the table above) and an optimizer "
                "step in each parameter's post-accumulate-grad hook that frees the gradient (optimizer in "
                "backward; no gradients before the step)."
            ),
            "",
            "| depth | method | accumulation MiB | optimizer-in-backward MiB | stream tensors (acc. / opt.) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            opt = r.get("optimizer_in_backward_bytes")
            if opt is None:
                continue
            stream = _stream_bytes(cfg, r["seq"])
            lines.append(
                f"| {r['depth']} | {r['method']} | {_mib(r['activation_bytes'])} | {_mib(opt)} | "
                f"{r['activation_bytes'] / stream:.1f} / {opt / stream:.1f} |"
            )
    if result.get("sweep"):
        seqs = sorted({r["seq"] for r in result["sweep"]})
        names = list(dict.fromkeys(r["method"] for r in result["sweep"]))
        by = {(r["method"], r["seq"]): r for r in result["sweep"]}
        lines += [
            "",
            f"Activation MiB by sequence length at depth {result['sweep'][0]['depth']} (batch {cfg['batch']}):",
            "",
            "| method | " + " | ".join(f"{n} tokens" for n in seqs) + " |",
            "| --- |" + " --- |" * len(seqs),
        ]
        for m in names:
            lines.append(
                f"| {m} | "
                + " | ".join(_mib(by[m, n]["activation_bytes"]) if (m, n) in by else "-" for n in seqs)
                + " |"
            )
    if result.get("budgets"):
        deepest = max(r["depth"] for r in rows)
        fitted = {m: e for m, e in result["budgets"].items() if e.get("fits", True)}
        left_out = {m: e for m, e in result["budgets"].items() if m not in fitted}
        lines += [
            "",
            (
                f"What fits in a memory budget (parameters + gradients + activation peak; optimizer state "
                f"excluded), from a least-squares fit of act = n (u + w depth) + k to the points above "
                f"(w = 0 for the reversible methods, w >= 0 otherwise; revfunc/bench/fit.py): longest "
                f"sequence (batch {cfg['batch']}) at depth {deepest}, and deepest stack at {cfg['seq']} "
                f"tokens."
            ),
            "",
            "| method | " + " | ".join(f"{g} GiB: tokens / depth" for g in BUDGETS_GIB) + " | fit residual |",
            "| --- |" + " --- |" * (len(BUDGETS_GIB) + 1),
        ]
        for m, e in fitted.items():
            cells = [
                " / ".join("n/a" if v is None else f"{v:,}" for v in e["budgets"][str(g)].values()) for g in BUDGETS_GIB
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {e['max_relative_residual']:.0%} |")
        if left_out:
            lines.append(
                "\nLeft out (fit residual above "
                f"{MAX_RESIDUAL:.0%}, not extrapolated): "
                + ", ".join(f"{m} {e['max_relative_residual']:.0%}" for m, e in left_out.items())
                + "."
            )
    if result.get("summary"):
        lines += [
            "",
            "Ratios at the deepest depth (this run): "
            + "; ".join(f"{k} {v:.2f}" for k, v in result["summary"].items())
            + ".",
        ]
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
    lines = [
        (
            f"Depth {depth}, d={cfg['dim']}, {cfg['batch']} x {cfg['seq']} tokens, "
            f"{_blocks_text(cfg)}, {cfg['dtype']} on "
            f"{result.get('machine', {}).get('device', cfg['device'])}; `{result['command']}`, "
            f"{result['date']}:"
        ),
        "",
        "| method | fwd+bwd time / plain | activation peak MiB | / plain | / checkpoint |",
        "| --- | --- | --- | --- | --- |",
    ]
    plain = by["plain"]["activation_bytes"]
    for m, r in by.items():
        act = r["activation_bytes"]
        vs_plain = "n/a" if act is None or not plain else f"{act / plain:.3f}x"
        vs_ck = "n/a" if act is None or not ck else f"{act / ck:.2f}x"
        lines.append(f"| {m} | {r['time_ratio']:.2f}x | {_mib(act)} | {vs_plain} | {vs_ck} |")
    return "\n".join(lines) + "\n"


def render_drift_markdown(result: dict) -> str:
    """The drift run as markdown: drift by dtype and depth, and the autocast gradient error
    (or, for ``--coupling``, one coupling's drift by dtype, depth and ``checkpoint_every``)."""
    if "coupling_drift" in result:
        return _render_coupling_drift(result)
    depths = sorted({d["depth"] for d in result["drift"]})
    dtypes = list(dict.fromkeys(d["dtype"] for d in result["drift"]))
    by = {(d["dtype"], d["depth"]): d["max_error"] for d in result["drift"]}
    lines = [
        _provenance(result),
        "",
        "| dtype | " + " | ".join(f"depth {n}" for n in depths) + " |",
        "| --- |" + " --- |" * len(depths),
    ]
    for t in dtypes:
        lines.append(f"| {t.replace('torch.', '')} | " + " | ".join(f"{by[t, n]:.1e}" for n in depths) + " |")
    lines += ["", "| checkpoint_every | bf16 autocast gradient error | stream tensors saved |", "| --- | --- | --- |"]
    for a in result["autocast"]:
        lines.append(f"| {a['checkpoint_every']} | {a['grad_error']:.1e} | {a['saved_stream_tensors']} |")
    if "classic_autocast_grad_error" in result:
        lines.append(f"| classic `reversible.py` | {result['classic_autocast_grad_error']:.1e} | - |")
    return "\n".join(lines) + "\n"


def _render_coupling_drift(result: dict) -> str:
    rows = result["coupling_drift"]
    depths = sorted({r["depth"] for r in rows})
    by = {(r["dtype"], r["checkpoint_every"], r["depth"]): r["max_error"] for r in rows}
    lines = [
        _provenance(result),
        "",
        f"Max relative error of the rebuilt block inputs, {result['coupling']}:",
        "",
        "| dtype | checkpoint_every | " + " | ".join(f"depth {n}" for n in depths) + " |",
        "| --- | --- |" + " --- |" * len(depths),
    ]
    for key in dict.fromkeys((r["dtype"], r["checkpoint_every"]) for r in rows):
        cells = [f"{by[key[0], key[1], n]:.1e}" if (key[0], key[1], n) in by else "-" for n in depths]
        lines.append(f"| {key[0].replace('torch.', '')} | {key[1]} | " + " | ".join(cells) + " |")
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
        panels += [
            ("depth", rows, "peak_bytes", "peak MiB (gradients + activation)"),
            ("depth", rows, "activation_bytes", "activation peak MiB"),
        ]
    if sweep:
        panels.append(("seq", sweep, "activation_bytes", f"activation peak MiB at depth {sweep[0]['depth']}"))
    tradeoff = any(r["activation_bytes"] is not None for r in rows)
    fig, axes = plt.subplots(1, len(panels) + tradeoff, figsize=(5 * (len(panels) + tradeoff), 4), squeeze=False)
    if tradeoff:  # time against activation: one point per method and depth, and the one-branch floor
        ax = axes[0][-1]
        for name in names:
            pts = [
                (r["activation_bytes"] * 2**-20, r["time_ratio"], r["depth"])
                for r in rows
                if r["method"] == name and r["activation_bytes"] is not None
            ]
            ax.plot([a for a, _, _ in pts], [t for _, t, _ in pts], marker="o", linestyle=":", label=name)
            for a, t, d in pts:
                ax.annotate(str(d), (a, t), fontsize=6, xytext=(2, 2), textcoords="offset points")
        floor = max((f["activation_bytes"] for f in (result.get("floor") or {}).values()), default=None)
        if floor:
            ax.axvline(floor * 2**-20, color="k", linestyle="--", label="one-branch floor")
        ax.set_xscale("log")
        ax.set_xlabel("activation peak MiB (points: depths)")
        ax.set_ylabel("fwd+bwd time / plain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, (xkey, data, key, label) in zip(axes[0], panels):
        scale = 1.0 if key == "time_ratio" else 2**-20
        positive = True
        for name in names:
            series = [(r[xkey], r[key]) for r in data if r["method"] == name and r[key] is not None]
            positive = positive and all(v > 0 for _, v in series)
            if series:
                ax.plot([a for a, _ in series], [v * scale for _, v in series], marker="o", label=name)
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
    fig.suptitle(
        f"revfunc.bench --preset {cfg['preset']}: d={cfg['dim']}, seq={cfg['seq']}, batch={cfg['batch']}, "
        f"{cfg['dtype']}{' ' + cfg['amp'] + ' autocast' if cfg.get('amp') else ''} on {cfg['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
