"""Offline profiler: measure what the planner's `CostModel` needs on the device at hand.

UNet step time against rows for each latent shape, VAE decode time against chunk size,
text-encoder time against prompt count, all through the engine's own `StepExecutor` so the
numbers include exactly the casts and copies an engine iteration pays. The result is a
`scheduling.cost_model.Profile`, keyed by GPU, model, dtype and fast path.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.conditioning import Prompt
from ..scheduling.cost_model import Profile, bucket_key

if TYPE_CHECKING:
    from ..contract.config import EngineConfig
    from .executor import StepExecutor

log = logging.getLogger("synerdiff.profiler")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_time(fn: Callable[[], object], sync: Callable[[], None], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `fn`; each repeat is bracketed by syncs so queued kernels are counted.

    The median, not the mean, because one stray allocator or clock hiccup would otherwise
    shift a point that the planner interpolates through.
    """
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


Size = tuple[int, int]
BESIDE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # where a one-image decode beside a step is timed
VAE_CHUNKS = (1, 2, 4, 8, 16)
ENCODE_PROMPTS = (1, 2, 4, 8, 16, 32)


@torch.inference_mode()
def beside_step_s(executor: StepExecutor, rows: int, lat: tuple[int, int, int], warmup: int = 2, repeats: int = 5) -> float:
    """Median time of a UNet step of `rows` with a one-image decode launched beside it on a
    second CUDA stream: what the engine does with `vae_beside_step`."""
    m = executor.model
    dev = m.device
    x = torch.randn(rows, *lat, device=dev, dtype=torch.float32)
    t = torch.full((rows,), 500.0, device=dev)
    c = executor.example_conditioning(rows, lat)
    z = torch.randn(1, *lat, device=dev, dtype=torch.float32)
    side = torch.cuda.Stream(dev)

    def together() -> None:
        pending = executor.decode_launch(z, side)
        executor.denoise(x, t, c)
        executor.decode_finish(pending)

    return median_time(together, synchronizer(dev), warmup, repeats)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def arithmetic(executor: StepExecutor) -> str:
    """The denoiser's arithmetic as profiles are keyed: its dtype, `+fp8` where every linear layer
    runs in float8, `+fp8-<digest>` where some do (`precision.layer_set`)."""
    if executor.precision != "fp8":
        return dtype_name(executor.model.dtype)
    which = executor.fp8_layers
    return dtype_name(executor.model.dtype) + ("+fp8" if which in (None, "all") else f"+fp8-{which}")


def _until_oom(label: str, counts, time_one, dev: torch.device, progress: bool, per_item: str | None = None) -> list[tuple[int, float]]:
    """Time `time_one(n)` for each n, stopping at the first that runs out of memory."""
    pts: list[tuple[int, float]] = []
    for n in counts:
        try:
            s = time_one(n)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            log.warning("%s=%d ran out of memory; stopping there", label, n)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            break
        pts.append((n, s))
        if progress:
            rate = f" ({n / s:.0f} {per_item}/s)" if per_item else ""
            print(f"profile {label}={n}: {s * 1e3:.2f} ms{rate}", flush=True)
    return _monotone(pts)


def model_id(path: str | Path) -> str:
    """The resolved directory plus a fingerprint of its denoiser (UNet or transformer), so that
    replacing the weights in place (a retrained model, another architecture) invalidates profiles
    made for the old ones."""
    import hashlib

    root = Path(path).resolve()
    h = hashlib.sha1()
    net = root / "unet" if (root / "unet").is_dir() else root / "transformer"
    if net.is_dir():
        for f in sorted(net.iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return f"{root}#{h.hexdigest()[:10]}"


def versions() -> dict[str, str]:
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def uses_fast_path(executor: StepExecutor) -> bool:
    return getattr(executor, "graphed", None) is not None


def uses_compiled(executor: StepExecutor) -> bool:
    graphed = getattr(executor, "graphed", None)
    return graphed is not None and bool(graphed.compiled)


def row_counts(max_rows: int, executor: StepExecutor | None = None) -> list[int]:
    """Powers of two up to max_rows; with the fast path, a subset of its graphs' row sizes: a step
    replays the smallest size that fits, so only those sizes occur, and they are
    fine enough that the cost model's linear interpolation between these stands for the rest."""
    if executor is not None and executor.graphed is not None:
        from .fastpath import PROFILE_ROWS

        # The replayed sizes are the only step sizes that occur; compiled lists are short, so all of them.
        sizes = sorted({r for shape in executor.graphed.shapes for r in executor.graphed.sizes(shape) if r <= max_rows})
        if executor.graphed.compiled:
            return sizes
        return [b for b in sizes if b in PROFILE_ROWS or b == max_rows]

    rows, r = [], 1
    while r < max_rows:
        rows.append(r)
        r *= 2
    return rows + [max_rows]


def parse_sizes(text: str) -> list[Size]:
    """'512x512,384x640' -> [(512, 512), (384, 640)] as (height, width)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise ValueError(f"size {part!r} is not HEIGHTxWIDTH")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _monotone(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Running maximum: a bigger batch never costs less; a dip is timing noise the planner must not chase."""
    out, best = [], 0.0
    for n, t in sorted(points):
        best = max(best, t)
        out.append((n, best))
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def profile_executor(
    executor: StepExecutor,
    model_path: str | Path,
    sizes: list[Size] | None = None,
    max_rows: int = 64,
    vae_chunks: tuple[int, ...] = VAE_CHUNKS,
    encode_prompts: tuple[int, ...] = ENCODE_PROMPTS,
    warmup: int = 2,
    repeats: int = 5,
    progress: bool = False,
) -> Profile:
    m = executor.model
    dev = m.device
    sync = synchronizer(dev)
    f = m.vae_scale_factor
    sizes = sizes or [(m.default_size, m.default_size)]
    unet: dict[str, list[tuple[int, float]]] = {}
    vae: dict[str, list[tuple[int, float]]] = {}
    beside: dict[str, list[tuple[int, float]]] = {}
    for h, w in sizes:
        lat = (m.latent_channels, h // f, w // f)

        def time_unet(rows: int, lat: tuple[int, int, int] = lat) -> float:
            x = torch.randn(rows, *lat, device=dev, dtype=torch.float32)
            t = torch.full((rows,), 500.0, device=dev)
            c = executor.example_conditioning(rows, lat)
            return median_time(partial(executor.denoise, x, t, c), sync, warmup, repeats)

        def time_vae(n: int, lat: tuple[int, int, int] = lat) -> float:
            z = torch.randn(n, *lat, device=dev, dtype=torch.float32)
            return median_time(partial(executor.decode, z), sync, max(1, warmup - 1), max(2, repeats - 2))

        key = bucket_key((h, w))
        unet[key] = _until_oom(f"unet {h}x{w} rows", row_counts(max_rows, executor), time_unet, dev, progress, per_item="rows")
        vae[key] = _until_oom(f"vae {h}x{w} chunk", vae_chunks, time_vae, dev, progress)
        if dev.type == "cuda":
            measured = dict(unet[key])
            beside[key] = [(r, max(0.0, beside_step_s(executor, r, lat, warmup, repeats) - measured[r])) for r in BESIDE_ROWS if r in measured]
    enc: list[tuple[int, float]] = []
    for n in encode_prompts:
        prompts = [Prompt(f"a photograph of object number {i}", height=m.default_size, width=m.default_size) for i in range(n)]
        enc.append((n, median_time(partial(executor.encode_prompts, prompts), sync, warmup, repeats)))
    return Profile(
        gpu=gpu_name(dev),
        model=model_id(model_path),
        dtype=arithmetic(executor),
        unet=unet,
        vae=vae,
        encode=_monotone(enc),
        vae_beside=beside,
        fast_path=uses_fast_path(executor),
        compiled=uses_compiled(executor),
        vae_compiled=executor.vae_compiled is not None,
        versions=versions(),
    )


def default_profile_path(executor: StepExecutor, model_path: str | Path) -> Path:
    import hashlib

    digest = hashlib.sha1(model_id(model_path).encode()).hexdigest()[:10]
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name(executor.model.device)).strip("-")
    return Path.home() / ".cache" / "synerdiff" / "profiles" / f"{gpu}-{arithmetic(executor)}-{digest}.json"


def ensure_profile(config: EngineConfig, executor: StepExecutor, path: str | Path | None = None) -> Profile:
    """The profile at `path` (else config.profile_path, else a per-GPU cache file) if it
    matches this GPU, model, dtype and fast path; otherwise a quick profile, saved there.

    Quick = the model's default size, rows in powers of two up to max_rows, 1 warm-up and
    3 repeats: a few seconds on a GPU, so an engine can afford it at start.
    """
    p = Path(path or config.profile_path or default_profile_path(executor, config.model))
    m = executor.model
    key = (
        gpu_name(m.device),
        model_id(config.model),
        arithmetic(executor),
        uses_fast_path(executor),
        uses_compiled(executor),
        executor.vae_compiled is not None,
    )
    if p.is_file():
        try:
            prof = Profile.load(p)
            if prof.matches(*key):
                return prof
            log.info("profile %s is for %s/%s/%s; re-profiling", p, prof.gpu, prof.model, prof.dtype)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("profile %s unreadable (%s); re-profiling", p, exc)
    prof = profile_executor(
        executor,
        config.model,
        max_rows=config.scheduler.max_rows,
        vae_chunks=(1, 2, 4, 8),
        encode_prompts=(1, 8),
        warmup=1,
        repeats=3,
    )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        prof.save(p)
    except OSError as exc:  # a read-only mounted profile: keep the fresh one in memory
        log.warning("could not save profile to %s: %s", p, exc)
    return prof
