"""The simulator's command line: capacity per seed from a profile."""

from __future__ import annotations


def test_simulate_cli_reports_capacity_per_seed(tmp_path):
    import json

    from synerdiff.scheduling.cost_model import reference_h100_sd15
    from synerdiff_bench.simulate import main

    prof = tmp_path / "p.json"
    reference_h100_sd15().save(prof)
    out = tmp_path / "sim.json"
    main(["--profile", str(prof), "--rates", "1,6", "--duration", "10", "--seeds", "0,1", "--slo", "5", "--out", str(out)])
    res = json.loads(out.read_text())
    assert {r["seed"] for r in res["rows"]} == {0, 1} and len(res["rows"]) == 2 * 2 * 4
    assert res["capacity"]["synerdiff"] == {"0": 1.0, "1": 1.0}  # 6 req/s is far past one H100
