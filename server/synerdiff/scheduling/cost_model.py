"""The hardware cost model the scheduler plans with, built from an offline profile.

A profile (written by `synerdiff profile`) holds measured UNet step times against rows for
each latent shape, VAE decode times against chunk size, and text-encoder times; it is keyed
by GPU, model and dtype so a pod never plans with another card's numbers. Between measured
points the model interpolates linearly; beyond the last it extrapolates with the last slope.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROFILE_VERSION = 2  # 2: vae_beside; version-1 files still load (the simulator), engines re-profile

Bucket = tuple[int, int]


def bucket_key(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket(key: str) -> Bucket:
    h, w = key.split("x")
    return int(h), int(w)


@dataclass
class Profile:
    gpu: str
    model: str
    dtype: str
    unet: dict[str, list[tuple[int, float]]]  # "HxW" -> [(rows, seconds per step)]
    vae: dict[str, list[tuple[int, float]]]  # "HxW" -> [(images, seconds per decode)]
    encode: list[tuple[int, float]] = field(default_factory=list)  # [(prompts, seconds)]
    # "HxW" -> [(rows, seconds a one-image decode on a second stream adds to a step of `rows`)]
    vae_beside: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    fast_path: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    version: int = PROFILE_VERSION
    compiled: bool = False  # the fast path's graphs were compiled
    vae_compiled: bool = False  # decodes went through the compiled one-image VAE

    def matches(self, gpu: str, model: str, dtype: str, fast_path: bool, compiled: bool = False, vae_compiled: bool = False) -> bool:
        mine = (self.version, self.gpu, self.model, self.dtype, self.fast_path, self.compiled, self.vae_compiled)
        return mine == (PROFILE_VERSION, gpu, model, dtype, fast_path, compiled, vae_compiled)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        raw = json.loads(Path(path).read_text())
        if raw.get("version") not in (1, PROFILE_VERSION):
            raise ValueError(f"{path}: profile version {raw.get('version')} is not {PROFILE_VERSION}; re-run `synerdiff profile`")

        def conv(d: dict[str, list[list[Any]]]) -> dict[str, list[tuple[Any, ...]]]:
            return {k: [tuple(p) for p in v] for k, v in d.items()}

        raw["unet"], raw["vae"] = conv(raw["unet"]), conv(raw["vae"])
        raw["vae_beside"] = conv(raw.get("vae_beside", {}))  # absent in profiles written before decodes beside a step were measured
        raw["encode"] = [tuple(p) for p in raw.get("encode", [])]
        return cls(**raw)


def _interp(points: list[tuple[int, float]], x: float) -> float:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if len(points) == 1:
        return ys[0] * max(x, 1) / max(xs[0], 1)
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return ys[i]
    if i == 0:
        return ys[0]  # below the smallest batch a step costs no less: the GPU is latency-bound there
    if i == len(xs):
        i -= 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class CostModel:
    def __init__(self, profile: Profile):
        self.profile = profile
        self._unet = {parse_bucket(k): sorted(v) for k, v in profile.unet.items()}
        self._vae = {parse_bucket(k): sorted(v) for k, v in profile.vae.items()}
        self._beside = {parse_bucket(k): sorted(v) for k, v in profile.vae_beside.items()}

    def _nearest(self, table: dict[Bucket, list[tuple[int, float]]], bucket: Bucket) -> tuple[list[tuple[int, float]], float]:
        """Points for `bucket`, or the closest measured shape and a pixel-count scale factor."""
        if bucket in table:
            return table[bucket], 1.0
        px = bucket[0] * bucket[1]
        near = min(table, key=lambda b: abs(b[0] * b[1] - px))
        return table[near], px / (near[0] * near[1])

    def unet_step_s(self, rows: int, bucket: Bucket) -> float:
        if rows <= 0:
            return 0.0
        pts, scale = self._nearest(self._unet, bucket)
        return _interp(pts, rows * scale)

    def vae_decode_s(self, images: int, bucket: Bucket) -> float:
        if images <= 0:
            return 0.0
        pts, scale = self._nearest(self._vae, bucket)
        return _interp(pts, images * scale)

    def vae_beside_s(self, rows: int, bucket: Bucket) -> float:
        """What one image decoded on a second stream adds to a step of `rows`; with no
        measurement for this shape, the whole decode (no overlap assumed)."""
        if not self._beside or bucket not in self._beside:
            return self.vae_decode_s(1, bucket)
        return max(0.0, _interp(self._beside[bucket], max(rows, 1)))

    def encode_s(self, prompts: int) -> float:
        return _interp(self.profile.encode, prompts) if self.profile.encode and prompts else 0.0

    def peak_rows_per_s(self, bucket: Bucket) -> float:
        pts, scale = self._nearest(self._unet, bucket)
        return max(r / (t * scale) for r, t in pts)

    def rows_for_throughput(self, fraction: float, bucket: Bucket, max_rows: int) -> int:
        """Fewest rows whose throughput reaches `fraction` of the peak: the threshold as rows."""
        peak = self.peak_rows_per_s(bucket)
        for r in range(1, max_rows + 1):
            if r / self.unet_step_s(r, bucket) >= fraction * peak:
                return r
        return max_rows


def reference_h100_sd15() -> Profile:
    """The eager SD1.5-shaped numbers measured on an NVIDIA H100 80GB HBM3.

    Used by the simulator and as the default when no profile matches; a real pod profiles itself.
    """
    unet = [(1, 0.0246), (2, 0.0272), (4, 0.0271), (8, 0.0330), (16, 0.0526), (32, 0.101), (64, 0.196), (128, 0.384)]
    vae = [(1, 0.022), (4, 0.067), (16, 0.233)]
    return Profile(
        gpu="NVIDIA H100 80GB HBM3", model="sd15-shaped", dtype="float16", unet={"512x512": unet}, vae={"512x512": vae}, encode=[(1, 0.003), (16, 0.006)]
    )
