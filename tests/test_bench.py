"""The benchmark runs end to end and reports what it promises (no timing asserts)."""

import json

import classic

from revfunc import bench


def test_bench_writes_json_and_plot_with_every_method(tmp_path):
    result = bench.main(["--depths", "2", "4", "--dim", "16", "--seq", "8", "--batch", "2", "--heads", "2",
                         "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows == result["rows"]
    assert (tmp_path / "bench.md").read_text() == bench.render_markdown(result)
    assert "| 4 | revfunc |" in (tmp_path / "bench.md").read_text() and result["command"].startswith("python -m")
    assert (tmp_path / "bench.png").stat().st_size > 0
    methods = {r["method"] for r in rows}
    classic_rows = {"classic"} if classic.available() else set()  # the classic code is optional
    assert methods == {"plain", "checkpoint", "revfunc", "plain/func.grad", "revfunc/func.grad"} | classic_rows
    by = {(r["method"], r["depth"]): r for r in rows}
    assert by["revfunc/func.grad", 2]["saved_bytes"] is None
    assert all(by["classic", d]["saved_bytes"] is None for d in (2, 4) if classic_rows)
    assert by["revfunc", 2]["saved_bytes"] == by["revfunc", 4]["saved_bytes"] > 0
    assert by["plain", 4]["saved_bytes"] > 1.5 * by["plain", 2]["saved_bytes"]
    assert all(r["peak_bytes"] is not None and r["peak_bytes"] >= 0 for r in rows)
    assert all(r["time_ratio"] > 0 for r in rows) and by["plain", 2]["time_ratio"] == 1.0


def test_drift_report_covers_dtypes_depths_and_checkpoint_every(tmp_path):
    result = bench.main(["--drift", "--dim", "8", "--seq", "4", "--batch", "2", "--heads", "2", "--out", str(tmp_path)])
    assert {(d["dtype"], d["depth"]) for d in result["drift"]} == {
        (t, n) for t in ("torch.float32", "torch.bfloat16", "torch.float16") for n in (1, 8, 64)}
    by_k = {a["checkpoint_every"]: a["grad_error"] for a in result["autocast"]}
    assert by_k[1] < 1e-6  # exact boundaries everywhere: only bf16 arithmetic itself
    assert json.loads((tmp_path / "drift.json").read_text()) == result
    assert (tmp_path / "drift.md").read_text() == bench.render_drift_markdown(result)
