"""The fidelity command runs at a tiny size and its numbers mean what they say."""

from __future__ import annotations

import json

from synerdiff_bench import fidelity, quality


def test_fidelity_reports_exact_chunked_and_skip_variants(tmp_path):
    out = tmp_path / "fid.json"
    fidelity.main(["--seeds", "5", "--bounds", "0.5", "--steps", "6", "--out", str(out)])
    res = json.loads(out.read_text())
    s = res["summary"]
    assert set(s) == {"exact", "chunked_vae", "skip_cfg_0.5", "exact_128x128", "tiled_vae_128x128"}
    assert s["exact"]["psnr_db_min"] == 100.0  # the reference against itself
    assert s["chunked_vae"]["psnr_db_min"] >= 60  # chunked decode is exact up to float rounding
    assert s["skip_cfg_0.5"]["psnr_db_mean"] < s["chunked_vae"]["psnr_db_mean"]  # skipping guidance changes pixels
    assert s["exact"]["images"] == 2 * len(fidelity.DEFAULT_PROMPTS)
    assert s["exact_128x128"]["psnr_db_min"] == 100.0
    assert s["tiled_vae_128x128"]["psnr_db_mean"] < 60  # tiles change pixels: it is measured, not assumed
    assert s["tiled_vae_128x128"]["images"] == s["exact"]["images"]
    assert "fidelity" in res["command"]


def test_ssim_is_one_for_identical_and_lower_for_noise():
    import torch

    a = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert abs(quality.ssim(a, a) - 1.0) < 1e-9
    assert quality.ssim(a, torch.rand(3, 32, 32)) < 0.2
