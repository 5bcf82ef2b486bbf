"""Does a VAE decode overlap a UNet step on the GPU? The premise of running decodes beside steps.

For each (UNet rows, decoded images): the median time of the graphed UNet step alone, the
decode alone, the two back to back on one stream (what the engine does), and the two
launched together on two streams. `overlap` is the fraction of the shorter one hidden by
running them together: 0 = they contend fully (no gain from a second stream), 1 = the
shorter one is free. Positive overlap at some row count is what a side-stream decode
could win there; none anywhere means decodes can only be moved between steps, not hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from synerdiff.engine.executor import StepExecutor
from synerdiff.engine.profiler import median_time, synchronizer


def overlap_fraction(t_unet: float, t_vae: float, t_together: float) -> float:
    """Share of the shorter task hidden when both run at once, clamped to [0, 1]."""
    shorter = min(t_unet, t_vae)
    if shorter <= 0:
        return 0.0
    return max(0.0, min(1.0, (t_unet + t_vae - t_together) / shorter))


@torch.inference_mode()
def measure_overlap(executor: StepExecutor, rows_list: list[int], images_list: list[int], repeats: int = 10) -> list[dict[str, Any]]:
    m = executor.model
    dev = m.device
    if dev.type != "cuda":
        raise RuntimeError("the overlap benchmark needs a CUDA device (two streams on one GPU)")
    sync = synchronizer(dev)
    f = m.vae_scale_factor
    size = m.default_size
    lat_shape = (m.latent_channels, size // f, size // f)
    side = torch.cuda.Stream(dev)
    main = torch.cuda.current_stream(dev)
    out = []
    for rows in rows_list:
        x = torch.randn(rows, *lat_shape, device=dev, dtype=m.dtype)
        t = torch.full((rows,), 500.0, device=dev)
        c = executor.example_conditioning(rows, lat_shape)
        for k in images_list:
            z = torch.randn(k, *lat_shape, device=dev, dtype=m.dtype)

            # Each closure is timed within this iteration, so binding the loop's tensors is intended.
            def unet():
                executor.denoise(x, t, c)  # noqa: B023

            def vae():
                m.vae.decode(z, return_dict=False)  # noqa: B023

            def serial():
                vae()
                unet()

            def together():
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    vae()
                unet()
                main.wait_stream(side)

            def singles():  # the engine's vae_beside_step: one-image chunks, one after another, beside the step
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    for i in range(k):  # noqa: B023
                        m.vae.decode(z[i : i + 1], return_dict=False)  # noqa: B023
                unet()
                main.wait_stream(side)

            t_u, t_v = median_time(unet, sync, 2, repeats), median_time(vae, sync, 2, repeats)
            t_s, t_t = median_time(serial, sync, 2, repeats), median_time(together, sync, 2, repeats)
            t_1 = median_time(singles, sync, 2, repeats)
            out.append(
                dict(rows=rows, images=k, unet_s=t_u, vae_s=t_v, serial_s=t_s, together_s=t_t, overlap=overlap_fraction(t_u, t_v, t_t), singles_beside_s=t_1)
            )
            print(
                f"rows {rows:3d} + decode {k}: unet {t_u * 1e3:6.1f} ms, vae {t_v * 1e3:6.1f} ms, "
                f"serial {t_s * 1e3:6.1f} ms, two streams {t_t * 1e3:6.1f} ms, overlap {out[-1]['overlap']:.0%}, "
                f"{k} one-image chunks beside {t_1 * 1e3:6.1f} ms",
                flush=True,
            )
    return out
