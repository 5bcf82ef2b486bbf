from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, SchedulerConfig
from synerdiff.engine import profiler
from synerdiff.engine.executor import StepExecutor
from synerdiff.scheduling.cost_model import CostModel, Profile
from synerdiff_bench.__main__ import main

from .conftest import TINY_RUN


def test_profile_cli_writes_a_loadable_profile_the_cost_model_uses(tmp_path, capsys):
    out = tmp_path / "p.json"
    main(
        [
            "profile",
            *TINY_RUN,
            "--sizes",
            "64x64,48x80",
            "--max-rows",
            "8",
            "--vae-chunks",
            "1,2,4",
            "--encode-prompts",
            "1,4",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "-o",
            str(out),
        ]
    )
    prof = Profile.load(out)
    assert prof.gpu == "cpu" and prof.dtype == "float32" and prof.model == profiler.model_id(EMBEDDED_MODEL_DIR)
    assert set(prof.unet) == {"64x64", "48x80"} and [r for r, _ in prof.unet["64x64"]] == [1, 2, 4, 8]
    assert {"torch", "diffusers"} <= set(prof.versions)
    cm = CostModel(prof)
    times = [cm.unet_step_s(r, (64, 64)) for r in range(1, 17)]  # 9..16 extrapolate
    assert all(t > 0 for t in times) and all(a <= b for a, b in pairwise(times))
    vae = [cm.vae_decode_s(n, (64, 64)) for n in range(1, 6)]
    assert all(a <= b for a, b in pairwise(vae)) and vae[0] > 0
    assert cm.encode_s(2) > 0 and cm.peak_rows_per_s((64, 64)) > 0
    assert 1 <= cm.rows_for_throughput(0.8, (64, 64), 8) <= 8
    assert "profile unet 64x64 rows=8" in capsys.readouterr().out


def test_measured_points_are_made_monotone():
    assert profiler._monotone([(4, 0.3), (1, 0.1), (2, 0.09)]) == [(1, 0.1), (2, 0.1), (4, 0.3)]


def test_row_counts_and_sizes():
    assert profiler.row_counts(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert profiler.row_counts(48) == [1, 2, 4, 8, 16, 32, 48]
    assert profiler.parse_sizes("512x512, 384x640") == [(512, 512), (384, 640)]
    with pytest.raises(ValueError):
        profiler.parse_sizes("512")


def test_ensure_profile_loads_a_match_and_reprofiles_a_mismatch(tiny_model, tmp_path, monkeypatch):
    cfg = EngineConfig(model=str(EMBEDDED_MODEL_DIR), device="cpu", dtype="float32", scheduler=SchedulerConfig(max_rows=4))
    ex = StepExecutor(tiny_model)
    path = tmp_path / "sub" / "prof.json"
    first = profiler.ensure_profile(cfg, ex, path)
    assert path.is_file() and [r for r, _ in first.unet["64x64"]] == [1, 2, 4]

    def boom(*a, **k):
        raise AssertionError("a matching profile must be loaded, not re-measured")

    monkeypatch.setattr(profiler, "profile_executor", boom)
    again = profiler.ensure_profile(cfg, ex, path)
    assert again.unet == first.unet
    monkeypatch.undo()
    other = Profile.load(path)
    other.gpu = "NVIDIA H100 80GB HBM3"
    other.save(path)
    fresh = profiler.ensure_profile(cfg, ex, path)
    assert fresh.gpu == "cpu" and Profile.load(path).gpu == "cpu"


def test_a_profile_is_keyed_by_the_arithmetic_and_the_compiled_vae(tiny_model, tmp_path, monkeypatch):
    """fp8 linears and the compiled VAE change what a step and a decode cost: a profile measured
    without them is not used with them (and the fp8 one lives in a file of its own)."""
    cfg = EngineConfig(model=str(EMBEDDED_MODEL_DIR), device="cpu", dtype="float32", scheduler=SchedulerConfig(max_rows=2))
    ex = StepExecutor(tiny_model)
    path = tmp_path / "prof.json"
    plain = profiler.ensure_profile(cfg, ex, path)
    assert plain.dtype == "float32" and plain.vae_compiled is False
    from synerdiff.engine.compiled_vae import CompiledVae

    ex.vae_compiled = CompiledVae(tiny_model.vae, dtype=torch.float32, device=tiny_model.device, backend="eager")  # nothing prepared: decodes stay eager
    calls = []
    real = profiler.profile_executor

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(profiler, "profile_executor", counted)
    assert profiler.ensure_profile(cfg, ex, path).vae_compiled is True and calls == [1]
    ex.vae_compiled = None
    ex.precision = "fp8"
    assert profiler.arithmetic(ex) == "float32+fp8"
    assert profiler.ensure_profile(cfg, ex, path).dtype == "float32+fp8" and calls == [1, 1]  # the 16-bit one is not used
    assert "float32+fp8" in str(profiler.default_profile_path(ex, EMBEDDED_MODEL_DIR))
    # Only some layers in float8 (fp8_layers: paying): another arithmetic, another profile.
    ex.fp8_layers = "0123abcd"
    assert profiler.arithmetic(ex) == "float32+fp8-0123abcd"
    assert profiler.ensure_profile(cfg, ex, path).dtype == "float32+fp8-0123abcd" and calls == [1, 1, 1]
    ex.fp8_layers = "all"
    assert profiler.arithmetic(ex) == "float32+fp8"
