from __future__ import annotations

import json

import pytest

from synerdiff_bench.__main__ import main
from synerdiff_bench.baselines import bench_engine_config, build_system, engine_config, parse_spec, weights_key

from .conftest import TINY_RUN


def test_smoke_writes_rows_per_step_and_all_requests(tmp_path):
    main(
        [
            "smoke",
            *TINY_RUN,
            "--size",
            "64x64",
            "--requests",
            "32",
            "--steps-choices",
            "2,3,4",
            "--stagger-s",
            "0.02",
            "--check-exact",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "s",
        ]
    )
    data = json.loads((tmp_path / "s.json").read_text())
    s = data["systems"]["continuous"]
    assert s["summary"]["all_ok"] and s["summary"]["all_finite"] and len(s["requests"]) == 32
    assert s["summary"]["max_rows"] > 2 and s["summary"]["exact"][0]["psnr_db"] > 40
    steps = [it for it in s["iterations"] if it["rows"]]
    assert steps and all(it["unet_s"] > 0 for it in steps)
    assert {r["sampler"] for r in s["requests"]} == {"ddim", "euler", "euler_a", "dpmpp_2m"}
    assert data["environment"]["torch"] and "smoke" in data["command"]


def test_specs_become_systems():
    base = bench_engine_config("/m", "cpu", "float32")
    name, opts = parse_spec("cont-b32:policy=continuous,max_rows=32,fast_path=false,max_queue=9")
    cfg = engine_config(base, {k: v for k, v in opts.items() if k != "kind"})
    assert name == "cont-b32" and cfg.scheduler.max_rows == 32 and cfg.scheduler.policy == "continuous"
    assert cfg.fast_path is False and cfg.limits.max_queue == 9 and cfg.model == "/m"
    listed = engine_config(base, {"fast_path_sizes": "640x384;512x512"})
    assert listed.fast_path_sizes == ["640x384", "512x512"]
    assert parse_spec("synerdiff") == ("synerdiff", {"kind": "engine", "policy": "synerdiff"})
    assert parse_spec("synerdiff:threshold=0.9")[1] == {"kind": "engine", "policy": "synerdiff", "threshold": "0.9"}
    st = build_system(*parse_spec("st16:kind=static,batch=16,wait=2"), base, model=object())
    assert (st.kind, st.batch, st.wait_s) == ("static", 16, 2.0)
    http = build_system(*parse_spec("srv:kind=http,url=http://h:1/"), base, None)
    assert http.url == "http://h:1/v1/images/generations"
    assert weights_key(opts, base) == "eager" and weights_key({"kind": "http"}, base) is None  # CPU: no fast path
    with pytest.raises(ValueError):
        engine_config(base, {"no_such_knob": "1"})
    with pytest.raises(ValueError):
        parse_spec("mystery")


def test_smoke_reports_saturated_throughput_against_the_profile(tmp_path):
    # A small row cap that many identical requests keep full: the saturated block must appear.
    main(
        [
            "smoke",
            *TINY_RUN,
            "--system",
            "sat:policy=synerdiff,max_rows=4",
            "--size",
            "64x64",
            "--requests",
            "16",
            "--steps-choices",
            "6",
            "--guidance-choices",
            "7.5",
            "--samplers",
            "euler",
            "--stagger-s",
            "0.0",
            "--check-exact",
            "0",
            "--out",
            str(tmp_path),
            "--name",
            "sat",
        ]
    )
    sat = json.loads((tmp_path / "sat.json").read_text())["systems"]["sat"]["summary"]["saturated"]
    assert sat is not None and sat["iterations"] >= 5 and sat["rows_per_s"] > 0
    assert 0 < sat["fraction_of_peak"] < 5  # measured against the engine's own profile of this CPU
