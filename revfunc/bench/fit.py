"""What fits in a memory budget: a least-squares model of the activation peak.

Per method, over every measured point (the depth sweep at ``--seq`` and the sequence
sweep at ``--sweep-depth``): ``act(depth, n) = n * (u + w * depth) + k``, O(n) per token
(SDPA never materializes the n x n matrix), ``w`` what a method stores per block and
token. The reversible methods (``revfunc``, ``classic``, compiled or not) store nothing
per block, so they are fitted flat in depth (``w = 0``); the others (selective saving
included: it keeps the attention output per block) with ``w >= 0``. (A model with a separate
per-block term cannot be fitted: the two sweeps cross at one point, so ``n * depth`` and
``depth`` are not separable.) The largest relative residual is reported, and a method
whose fit is worse than :data:`MAX_RESIDUAL` is not extrapolated (the report leaves it out).
"""

from __future__ import annotations

BUDGETS_GIB = (1, 8, 80)
MAX_RESIDUAL = 0.10
FLAT_IN_DEPTH = ("revfunc", "classic")


def budget_table(args, rows, sweep) -> dict:
    """``{method: {u, w, k, max_relative_residual, fits, budgets: {GiB: {longest_seq, deepest}}}}``.

    A training step fits in a budget when the parameters, their gradients and ``act``
    do (optimizer state excluded: Adam adds twice the parameters). Longest sequence: at
    the deepest measured depth, the ``n`` where that sum meets the budget. Deepest stack:
    at ``--seq``, the depth where it does, parameters growing by one block's bytes per block.
    """
    import torch

    per_block = rows[0]["grad_bytes"] / rows[0]["depth"]  # parameter bytes of one block
    deepest = max(args.depths)
    table = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = list(
            {
                (r["depth"], r["seq"]): (r["depth"], r["seq"], r["activation_bytes"])
                for r in rows + sweep
                if r["method"] == m and r["activation_bytes"] is not None
            }.values()
        )
        if len(pts) < 2:
            continue
        a = torch.tensor([[n, n * d, 1.0] for d, n, _ in pts], dtype=torch.float64)
        b = torch.tensor([[float(v)] for _, _, v in pts], dtype=torch.float64)
        w = 0.0
        if m.removesuffix("+compile") not in FLAT_IN_DEPTH:  # revfunc+attn keeps one tensor per block: w > 0
            u, w, k = torch.linalg.lstsq(a, b, driver="gelsd").solution.flatten().tolist()
        if w <= 0:  # flat in depth
            w = 0.0
            u, k = torch.linalg.lstsq(a[:, [0, 2]], b, driver="gelsd").solution.flatten().tolist()
        fit = [n * (u + w * d) + k for d, n, _ in pts]
        worst = max(abs(f - v) / max(v, 1) for f, (_, _, v) in zip(fit, pts))
        entry = {"u": u, "w": w, "k": k, "max_relative_residual": worst, "fits": worst <= MAX_RESIDUAL, "budgets": {}}
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
