"""The benchmark runs end to end and reports what it promises (no timing asserts)."""

import json
import pathlib
import tempfile

import classic

from revfunc import bench


def test_bench_writes_json_and_plot_with_every_method(tmp_path):
    result = bench.main(
        [
            "--depths",
            "2",
            "4",
            "--dim",
            "16",
            "--seq",
            "32",
            "--batch",
            "2",
            "--heads",
            "2",
            "--seqs",
            "16",
            "--sweep-depth",
            "2",
            "--functional",
            "--no-selective",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert str(tmp_path) not in json.dumps(saved["config"]["classic"]) and "/" not in saved["config"]["classic"]
    assert saved["rows"] == result["rows"] and saved["sweep"] == result["sweep"]
    assert (tmp_path / "bench.md").read_text() == bench.render_markdown(result)
    assert "| 4 | revfunc |" in (tmp_path / "bench.md").read_text() and result["command"].startswith("python -m")
    assert (tmp_path / "bench.png").stat().st_size > 0
    rows = result["rows"]
    methods = {r["method"] for r in rows}
    classic_rows = {"classic"} if classic.available() else set()  # the classic code is optional
    assert methods == {"plain", "checkpoint", "revfunc", "plain/func.grad", "revfunc/func.grad"} | classic_rows
    by = {(r["method"], r["depth"]): r for r in rows}
    assert by["revfunc/func.grad", 2]["saved_bytes"] is None
    assert all(by["classic", d]["saved_bytes"] is None for d in (2, 4) if classic_rows)
    assert by["revfunc", 2]["saved_bytes"] == by["revfunc", 4]["saved_bytes"] > 0
    assert by["plain", 4]["saved_bytes"] > 1.5 * by["plain", 2]["saved_bytes"]
    # Every row has the activation (measured above the pre-allocated gradients) and the
    # peak column (activation + gradients).
    for r in rows:
        assert r["activation_bytes"] is not None and r["activation_bytes"] >= 0
        assert r["peak_bytes"] == r["activation_bytes"] + r["grad_bytes"]
        assert r["activation_streams"] == r["activation_bytes"] / (2 * 32 * 16 * 4)
    assert all(r["time_ratio"] > 0 for r in rows) and by["plain", 2]["time_ratio"] == 1.0
    # The sequence sweep covers every method at the sweep depth, and the budget table
    # has every method and budget.
    assert {(r["method"], r["seq"]) for r in result["sweep"]} == {(m, n) for m in methods for n in (16, 32)}
    assert set(result["budgets"]) == methods
    assert all(e["fits"] == (e["max_relative_residual"] <= 0.10) for e in result["budgets"].values())
    # One branch's recomputation alone: the floor the reversible methods are compared to.
    assert set(result["floor"]) == {"floor/f", "floor/g"}
    assert all(f["activation_bytes"] >= 0 for f in result["floor"].values())
    assert all(set(e["budgets"]) == {"1", "8", "80"} for e in result["budgets"].values())


def test_presets_fill_unset_flags_and_flags_override_them():
    args = bench.parse_args([])
    assert (args.preset, args.dim, args.seq, args.batch, args.depths) == ("long", 64, 2048, 1, [8, 16, 32])
    assert args.causal and args.seqs and not args.no_memory
    args = bench.parse_args(["--preset", "overhead", "--depths", "4"])
    assert (args.dim, args.seq, args.batch, args.threads, args.depths, args.no_memory) == (16, 1, 1, 1, [4], True)
    assert bench.parse_args(["--preset", "short"]).functional


def test_budget_table_follows_from_the_fit():
    """A method whose activation is exactly n * (u + w * depth) + k gets that fit back,
    and the budget answers solve it."""
    args = bench.parse_args(["--depths", "8", "32", "--seq", "1000"])
    u, w, k, per_block = 100.0, 10.0, 5e6, 4e5
    pts = [(d, 1000) for d in (8, 16, 32)] + [(8, n) for n in (500, 2000)]
    rows = [
        {"method": "m", "depth": d, "seq": n, "grad_bytes": per_block * d, "activation_bytes": n * (u + w * d) + k}
        for d, n in pts
    ]
    fit = bench.budget_table(args, rows, [])["m"]
    assert max(abs(fit[name] - want) / want for name, want in zip("uwk", (u, w, k))) < 1e-6
    assert fit["max_relative_residual"] < 1e-9

    def total(d, n):
        return 2 * per_block * d + n * (u + w * d) + k

    longest = fit["budgets"]["8"]["longest_seq"]
    assert total(32, longest) <= 8 * 2**30 < total(32, longest + 1)
    deepest = fit["budgets"]["1"]["deepest"]
    assert total(deepest, 1000) <= 2**30 < total(deepest + 1, 1000)


def test_drift_report_covers_dtypes_depths_and_checkpoint_every(tmp_path):
    result = bench.main(["--drift", "--dim", "8", "--seq", "4", "--batch", "2", "--heads", "2", "--out", str(tmp_path)])
    assert {(d["dtype"], d["depth"]) for d in result["drift"]} == {
        (t, n) for t in ("torch.float32", "torch.bfloat16", "torch.float16") for n in (1, 8, 64)
    }
    by_k = {a["checkpoint_every"]: a["grad_error"] for a in result["autocast"]}
    assert by_k[1] < 1e-6  # exact boundaries everywhere: only bf16 arithmetic itself
    assert json.loads((tmp_path / "drift.json").read_text()) == result
    assert (tmp_path / "drift.md").read_text() == bench.render_drift_markdown(result)


def test_the_long_preset_activations_are_at_least_the_one_branch_floor():
    """No reversible backward holds less than one branch's own recomputation and vjp: a
    figure below the floor is a measuring error. Measured on the long preset's blocks
    (d=64, causal SDPA) at 512 tokens, depth 4, every method of the preset (selective
    saving included)."""
    result = bench.main(
        [
            "--depths",
            "4",
            "--seq",
            "512",
            "--seqs",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(pathlib.Path(tempfile.mkdtemp())),
        ]
    )
    assert {"revfunc+attn", "checkpoint+attn"} <= {r["method"] for r in result["rows"]}
    floor = max(f["activation_bytes"] for f in result["floor"].values())
    assert floor > 0
    for r in result["rows"]:
        assert r["activation_bytes"] >= floor, (r["method"], r["depth"], r["activation_bytes"], floor)


def test_a_budget_fit_worse_than_ten_percent_is_left_out_of_the_table():
    args = bench.parse_args(["--depths", "8", "16", "32", "--seq", "1000"])
    points = [(d, 1000) for d in (8, 16, 32)] + [(8, n) for n in (500, 2000)]
    activation = {
        "plain": lambda d, n: n * (100 + 10 * d) + 5e6,  # fits its model exactly
        "revfunc": lambda d, n: 1e6 * d,
    }  # grows with depth: the flat reversible model cannot fit
    rows, sweep = [], []
    for m, act in activation.items():
        for d, n in points:
            row = {
                "method": m,
                "depth": d,
                "seq": n,
                "grad_bytes": 1e5 * d,
                "activation_bytes": act(d, n),
                "time_ratio": 1.0,
                "seconds": 1.0,
                "extra_us_per_block": 0,
                "saved_bytes": None,
                "peak_bytes": None,
                "activation_streams": None,
                "compile_seconds": None,
            }
            (rows if n == 1000 else sweep).append(row)
    table = bench.budget_table(args, rows, sweep)
    assert table["plain"]["fits"] and table["plain"]["max_relative_residual"] < 1e-9
    assert not table["revfunc"]["fits"] and table["revfunc"]["max_relative_residual"] > 0.10
    text = bench.render_tables({"rows": rows, "config": vars(args), "budgets": table})
    budget_text = text.split("What fits")[1]
    assert "| plain |" in budget_text and "| revfunc |" not in budget_text
    assert "Left out (fit residual above 10%, not extrapolated): revfunc" in budget_text


def test_sharded_per_block_step_peak_is_flat_in_depth_while_root_only_grows():
    """``revfunc.bench.sharded`` on 2 gloo processes (d=256, 64 tokens; one block's
    float32 parameters are 3 MiB, well above the RSS noise of about 0.5 MiB): FSDP2 per
    block adds less than one block's parameters to the step peak from depth 2 to 8; root
    only gathers the 6 extra blocks' parameters and gradients. Both keep the same shards
    between steps."""
    from revfunc.bench import sharded

    block_mib = 12 * 256 * 256 * 4 / 2**20  # attention 4 d^2 + feed-forward 8 d^2, float32
    per_block = {r["depth"]: r for r in sharded.run_method("fsdp per block", [2, 8], 256, 64)}
    root_only = {r["depth"]: r for r in sharded.run_method("fsdp root only", [2, 8], 256, 64)}
    assert per_block[8]["step_peak_mib"] - per_block[2]["step_peak_mib"] < block_mib
    assert root_only[8]["step_peak_mib"] - root_only[2]["step_peak_mib"] > 6 * block_mib
    assert per_block[8]["state_mib"] == root_only[8]["state_mib"]


def _harness_worker(rank, init_file, how):
    import os

    from revfunc.bench.sharded import finish_gloo, init_gloo

    init_gloo(rank, 2, init_file, hang_s=60)
    if how == "fails" and rank == 1:
        raise ValueError("rank 1 fails before finishing")
    if how == "aborts_after_work" and rank == 1:  # finish_gloo's steps, then an abort in teardown
        import pathlib

        import torch.distributed as dist

        dist.barrier()
        pathlib.Path(f"{init_file}.rank{rank}.done").touch()
        os.abort()
    finish_gloo(rank, init_file)


def test_gloo_workers_report_a_failing_rank_and_accept_a_teardown_abort(tmp_path):
    import pytest

    from revfunc.bench.sharded import run_gloo_workers

    run_gloo_workers(_harness_worker, (str(tmp_path / "a"), "aborts_after_work"), 2, str(tmp_path / "a"), 60, "w")
    # Rank 0 fails too (its peer is gone at the barrier), or is killed once rank 1 has failed.
    with pytest.raises(
        RuntimeError,
        match=r"^w: ranks \[(0, )?1\] failed before finishing their work; exit codes "
        r"\[-?\d+, 1\]",
    ):
        run_gloo_workers(_harness_worker, (str(tmp_path / "b"), "fails"), 2, str(tmp_path / "b"), 60, "w")


def test_the_flow_benchmark_writes_its_table(tmp_path):
    from revfunc.bench import flows

    result = flows.main(
        ["--depths", "1,2", "--batch", "64", "--hidden", "16", "--repeats", "1", "--out", str(tmp_path)]
    )
    assert [r["depth"] for r in result["rows"]] == [1, 2]
    assert set(result["methods"]) == ({"freia", "plain", "revfunc"} if flows.have_freia() else {"plain", "revfunc"})
    assert all(r["time"][m] > 0 for r in result["rows"] for m in result["methods"])
    base = "freia" if flows.have_freia() else "plain"
    assert all(r["time_ratio"][base] == 1.0 and r["time_ratio"]["revfunc"] > 0 for r in result["rows"])
    assert "| depth |" in (tmp_path / "flows.md").read_text()
