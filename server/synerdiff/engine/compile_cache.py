"""An on-disk cache of the compiled UNet kernels, shared by restarts and by the pods of a pool.

A cold `torch.compile` of an SD-sized UNet costs 40-50 s per static row size on an H200; with
inductor's caches warm the same size rebuilds in seconds. `torch.compiler.save_cache_artifacts`
packs every cache the compile touched (inductor's FX graphs, Triton kernels, autotuning
results) into one blob, and `load_cache_artifacts` unpacks it into this process's local caches
before compiling. The blob is stored as one file whose name is a digest of everything that
changes the generated code: GPU, torch/Triton/diffusers versions, the UNet's config (not its
weights: inductor passes them as inputs, so a fine-tune of the same architecture reuses the
kernels), dtype, latent shapes, row sizes, compile mode and attention backend. A file is
written under a temporary name and renamed into place, so concurrent writers (the pods of a
pool starting together on one shared volume) never leave a torn file: the last rename wins,
and every candidate is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..models.files import write_atomic

log = logging.getLogger("synerdiff.compile_cache")

# Bumped when what the blob holds, or how it is keyed, changes meaning.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/synerdiff/compile`, or `~/.cache/synerdiff/compile`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "synerdiff" / "compile"


def model_fingerprint(unet_config: Mapping[str, object]) -> str:
    """A digest of the UNet's architecture (its config), blind to weights and to bookkeeping keys."""
    arch = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(facts: Mapping[str, object]) -> str:
    """The file stem for a set of facts: equal facts give equal keys, any change a new one."""
    text = json.dumps({"format": CACHE_FORMAT, **facts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CompileCache:
    """One cache entry: `<root>/<key>.bin` (the artifacts) and `<root>/<key>.json` (what they are for)."""

    root: Path
    facts: dict[str, object]

    @property
    def key(self) -> str:
        return cache_key(self.facts)

    @property
    def blob_path(self) -> Path:
        return self.root / f"{self.key}.bin"

    @property
    def meta_path(self) -> Path:
        return self.root / f"{self.key}.json"

    def exists(self) -> bool:
        return self.blob_path.is_file()

    def remembered(self, name: str) -> str | None:
        """A choice stored beside the blob by the start that compiled it (the attention backend measured then)."""
        try:
            value = json.loads(self.meta_path.read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def load(self) -> bool:
        """Unpack a stored blob into this process's compile caches; False when there is none or it is unreadable."""
        import torch

        try:
            blob = self.blob_path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("compile cache %s unreadable (%s); compiling cold", self.blob_path, exc)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as exc:  # a blob from another build must cost a cold start, never the start
            log.warning("compile cache %s could not be loaded (%s); compiling cold", self.blob_path, exc)
            return False
        if info is None:  # torch reports a corrupt blob by returning None
            log.warning("compile cache %s is corrupt; compiling cold", self.blob_path)
            return False
        log.info("compile cache loaded: %s (%.1f MB)", self.blob_path, len(blob) / 1e6)
        return True

    def save(self, extra: Mapping[str, object] | None = None) -> int:
        """Pack what this process compiled and store it; the bytes written (0 when nothing to save or the folder is read-only)."""
        import torch

        packed = torch.compiler.save_cache_artifacts()
        if packed is None:
            return 0
        blob = packed[0]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.blob_path, blob)
            write_atomic(self.meta_path, json.dumps({"facts": self.facts, "bytes": len(blob), **(extra or {})}, indent=2, default=str).encode())
        except OSError as exc:  # a read-only cache (a pool's readers) is served, just not refilled
            log.warning("compile cache not written to %s: %s", self.root, exc)
            return 0
        log.info("compile cache written: %s (%.1f MB)", self.blob_path, len(blob) / 1e6)
        prune(self.root, keep=KEEP_ENTRIES, current=self.key)
        return len(blob)


# Entries kept in a folder: each upgrade of torch, the model or the row sizes writes a new one
# (hundreds of MB for an SD-sized UNet), and a rollout runs two versions side by side for a while.
KEEP_ENTRIES = 4
STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died


def prune(root: Path, keep: int = KEEP_ENTRIES, current: str = "", now: float | None = None) -> list[str]:
    """Remove all but the `keep` most recently written entries (never `current`) and abandoned
    temporary files; the keys removed. Best effort: a file another pod removed first is fine."""
    import time

    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        blobs = sorted(root.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
        temps = list(root.glob(".*.tmp"))
    except OSError:
        return removed
    for blob in [b for b in blobs if b.stem != current][max(0, keep - 1) :]:
        for path in (blob, blob.with_suffix(".json")):
            path.unlink(missing_ok=True)
        removed.append(blob.stem)
    for tmp in temps:
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
    if removed:
        log.info("compile cache: removed %d older entries from %s", len(removed), root)
    return removed
