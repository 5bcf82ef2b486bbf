"""Download a diffusers pipeline from the Hugging Face Hub: only the files the engine loads, at one commit.

A Stable Diffusion repository holds far more than a pipeline needs: every weight variant (fp32,
fp16, ema), single-file checkpoints at the root, ONNX and Flax exports, a safety checker the
engine never runs. `pipeline_files` picks, from the repository's file list and its
`model_index.json`, the configs, tokenizer files and one set of weights per component the engine
loads, in the dtype's variant where the repository has it. `fetch` resolves the revision to a
commit once, downloads those files at that commit (huggingface_hub does the HTTP, resumes and
retries), and records what it did in `SOURCE_FILE` beside them. A later fetch into the same folder
with the same pin key (a pool and its model spec) reuses the recorded commit without asking the Hub
which commit a branch points to now, so replicas sharing a claim never serve different weights
because a branch moved between their starts. `single_writer` lets one process at a time download
into a folder, so pods sharing a claim fetch it once. `objectstore.py` does the same for S3 and GCS
with these pieces (`pipeline_files`, the record, `write_atomic`).

With `adapters=True` the source is a folder of LoRA adapters instead of a pipeline (no
`model_index.json`): `adapter_files` picks the adapters as the engine reads them (`NAME.safetensors`
at the root, `NAME/pytorch_lora_weights.safetensors` one level down), and `prune_adapters` removes
adapters the source no longer has, so the folder serves what the source holds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import write_atomic

log = logging.getLogger("synerdiff.fetch")

SOURCE_FILE = ".synerdiff-source.json"
LOCK_FILE = ".synerdiff-fetch.lock"
# Components the engine loads; others a pipeline lists (safety_checker, feature_extractor,
# image_encoder) are never read.
LOADED_COMPONENTS = frozenset(
    {"unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"}
)
# What a component folder holds besides weights: configs, tokenizer vocabularies and merges, sentencepiece models.
SMALL_FILES = (".json", ".txt", ".model")
WEIGHT_FORMATS = (".safetensors", ".bin")  # in order of preference
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
ADAPTER_SUFFIX = ".safetensors"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # NAME/ADAPTER_FILE: diffusers' save_lora_weights layout


class FetchError(RuntimeError):
    pass


def weight_variant(filename: str) -> str | None:
    """The variant infix of a weight file: `diffusion_pytorch_model.fp16.safetensors` -> fp16, also sharded."""
    stem = filename.rsplit("/", 1)[-1]
    for ext in WEIGHT_FORMATS:
        if stem.endswith(ext):
            stem = _SHARD.sub("", stem.removesuffix(ext))
            return stem.rsplit(".", 1)[1] if "." in stem else None
    return None


def pipeline_files(model_index: Mapping[str, Any], files: Sequence[str], dtype: str) -> list[str]:
    """The files of a repository the engine needs to load its pipeline in `dtype`."""
    want = "fp16" if dtype == "float16" else None
    components = sorted(k for k, v in model_index.items() if k in LOADED_COMPONENTS and isinstance(v, list) and v and v[0] is not None)
    out = {"model_index.json"}
    for comp in components:
        inside = [f for f in files if f.startswith(comp + "/") and "/" not in f[len(comp) + 1 :]]
        out.update(f for f in inside if f.endswith(SMALL_FILES))
        for ext in WEIGHT_FORMATS:
            of_format = [f for f in inside if f.endswith(ext)]
            variants = {weight_variant(f) for f in of_format}
            # The dtype's variant, else the plain weights, else the one variant there is (fp16 first):
            # the loader loads a variant-only folder as that variant and casts to the dtype.
            pick = want if want in variants else None if None in variants else min(variants, key=lambda v: (v != "fp16", v or ""), default=None)
            chosen = [f for f in of_format if weight_variant(f) == pick]
            if chosen:
                out.update(chosen)
                break
    return sorted(out)


def adapter_files(files: Sequence[str]) -> list[str]:
    """The LoRA adapters of a folder's file list, as the engine reads them: NAME.safetensors at the
    root, NAME/pytorch_lora_weights.safetensors one level down (hidden names skipped)."""
    out = []
    for f in files:
        parts = f.split("/")
        if any(p.startswith(".") or not p for p in parts):
            continue
        if (len(parts) == 1 and f.endswith(ADAPTER_SUFFIX)) or (len(parts) == 2 and parts[1] == ADAPTER_FILE):
            out.append(f)
    return sorted(out)


def prune_adapters(dest: Path, files: Sequence[str]) -> list[str]:
    """Remove adapters the fetch did not choose (the source no longer has them): the engine serves
    whatever the folder holds."""
    held = [p.relative_to(dest).as_posix() for p in (*dest.glob(f"*{ADAPTER_SUFFIX}"), *dest.glob(f"*/{ADAPTER_FILE}")) if p.is_file()]
    removed = [f for f in adapter_files(held) if f not in set(files)]
    for rel in removed:
        (dest / rel).unlink(missing_ok=True)
        if "/" in rel:
            try:
                (dest / rel).parent.rmdir()
            except OSError:
                pass  # it holds other files
    if removed:
        log.info("removed %d adapter(s) the source no longer has: %s", len(removed), ", ".join(removed[:5]))
    return removed


@dataclass
class Fetched:
    repo: str
    revision: str  # as asked: a branch, a tag or a commit
    commit: str  # what it resolved to
    dtype: str
    files: list[str] = field(default_factory=list)
    pin_key: str = ""
    # Object stores: each file's ETag (S3) or generation (GCS); `commit` is then a digest of the listing.
    versions: dict[str, str] = field(default_factory=dict)
    reused: bool = False  # the folder already held these files: nothing was downloaded
    kind: str = "pipeline"  # or "adapters": a folder of LoRA adapters

    def to_json(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "reused" and (v or k != "versions")}
        if self.kind == "pipeline":  # records of pipelines read as before
            del fields["kind"]
        return json.dumps(fields, indent=2) + "\n"


def recorded(dest: Path) -> Fetched | None:
    try:
        data = json.loads((dest / SOURCE_FILE).read_text())
        rec = Fetched(**{k: data[k] for k in ("repo", "revision", "commit", "dtype", "files", "pin_key")})
        rec.versions = dict(data.get("versions") or {})
        rec.kind = str(data.get("kind") or "pipeline")
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete(dest: Path, rec: Fetched) -> bool:
    return all((dest / f).is_file() for f in rec.files)


@contextmanager
def single_writer(dest: Path, wait_s: float | None = None) -> Iterator[bool]:
    """Hold the folder's lock while fetching into it: pods sharing a claim download it once, and the
    others wait, then find the first one's record and reuse it. The lock is released when the
    process ends however it ends (a timeout, a kill). Yields whether the lock is held.

    Without it (a filesystem without locks, a folder this process may only read, or a holder that
    outlived `wait_s`, as a crashed node's NFS lock can) the fetch still runs: each writer downloads
    to its own temporary names and renames them into place, so concurrent writers never mix bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError:
        try:  # a folder this process may not write (a claim filled by someone else): flock works on a read-only descriptor
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            log.warning("%s cannot be locked (%s); going on without the lock", dest, exc)
            yield False
            return
    try:
        yield _lock(fd, dest, wait_s)
    finally:
        os.close(fd)


def _lock(fd: int, dest: Path, wait_s: float | None) -> bool:
    deadline = None if wait_s is None else time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not waiting:
                log.info("another download into %s is under way; waiting for it", dest)
                waiting = True
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("%s is still locked after %.0f s; going on without the lock", dest, wait_s)
                return False
            time.sleep(1.0)
        except OSError as exc:
            log.warning("%s cannot be locked (%s); going on without the lock", dest, exc)
            return False


def prune_weights(dest: Path, files: Sequence[str]) -> list[str]:
    """Remove weight files of the loaded components that the fetch did not choose (an earlier
    listing's other variant or format): the loader picks a variant by what a folder holds, so a
    leftover would be loaded in place of what the record names."""
    chosen = set(files)
    folders = {f.split("/", 1)[0] for f in files if "/" in f}
    removed = []
    for folder in sorted(folders):
        for weight in (dest / folder).iterdir() if (dest / folder).is_dir() else ():
            rel = f"{folder}/{weight.name}"
            if weight.is_file() and weight.name.endswith(WEIGHT_FORMATS) and rel not in chosen:
                weight.unlink(missing_ok=True)
                removed.append(rel)
    if removed:
        log.info("removed %d weight file(s) the pipeline no longer loads: %s", len(removed), ", ".join(removed[:5]))
    return removed


def forget(dest: Path, rec: Fetched | None, keep: Sequence[str] = ()) -> None:
    """Before a fetch changes files of a folder with a record: leave a record that no pinned fetch
    reuses and that names only the files kept as they are, so a fetch that dies half-way leaves
    nothing that passes for complete."""
    if rec is None:
        return
    kept = [f for f in rec.files if f in set(keep)]
    if not kept:
        (dest / SOURCE_FILE).unlink(missing_ok=True)
        return
    rec = Fetched(rec.repo, rec.revision, rec.commit, rec.dtype, kept, "", {f: v for f, v in rec.versions.items() if f in kept}, kind=rec.kind)
    write_atomic(dest / SOURCE_FILE, rec.to_json())


def fetch(
    repo: str, revision: str, dest: str | Path, dtype: str = "float16", *, pin_key: str = "", token: str | None = None, adapters: bool = False
) -> Fetched:
    """Download what the engine loads of `repo` at `revision` into `dest` (with `adapters`, the
    repository's LoRA adapters); see the module doc."""
    from huggingface_hub import HfApi, hf_hub_download

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    kind = "adapters" if adapters else "pipeline"
    rec = recorded(dest)
    same = rec is not None and rec.repo == repo and rec.dtype == dtype and rec.kind == kind and complete(dest, rec)
    if same and rec is not None and (rec.commit == revision or (pin_key and rec.pin_key == pin_key and rec.revision == revision)):
        log.info("%s already holds %s at %s (%d files); nothing to download", dest, repo, rec.commit, len(rec.files))
        rec.reused = True
        return rec
    try:
        info = HfApi(token=token).model_info(repo, revision=revision)
        if not info.sha:
            raise FetchError(f"the Hub did not say which commit {repo}@{revision} is")
        commit = info.sha
        listing = [s.rfilename for s in info.siblings or []]
        if adapters:
            files = adapter_files(listing)
            if not files:
                raise FetchError(f"{repo}@{commit} holds no adapters (NAME.safetensors, or NAME/{ADAPTER_FILE})")
            forget(dest, rec)
            log.info("downloading %d adapter(s) of %s@%s", len(files), repo, commit)
            for k, name in enumerate(files):
                hf_hub_download(repo, name, revision=commit, local_dir=dest, token=token)
                log.info("adapter %d of %d: %s", k + 1, len(files), name)
        elif "model_index.json" not in listing:
            raise FetchError(f"{repo}@{commit} has no model_index.json: not a diffusers pipeline repository")
        else:
            # Files by name, at the commit: huggingface_hub resumes partial files and skips complete ones.
            forget(dest, rec)
            index_path = hf_hub_download(repo, "model_index.json", revision=commit, local_dir=dest, token=token)
            model_index = json.loads(Path(index_path).read_text())
            files = pipeline_files(model_index, listing, dtype)
            log.info("downloading %d of %d files of %s@%s (%s)", len(files), len(listing), repo, commit, dtype)
            for k, name in enumerate(f for f in files if f != "model_index.json"):
                hf_hub_download(repo, name, revision=commit, local_dir=dest, token=token)
                log.info("file %d of %d: %s", k + 1, len(files) - 1, name)
    except FetchError:
        raise
    except Exception as exc:  # the Hub's errors, its transport's, a full disk, a bad index: one message
        raise FetchError(f"could not download {repo}@{revision}: {type(exc).__name__}: {exc}") from exc
    done = Fetched(repo=repo, revision=revision, commit=commit, dtype=dtype, files=files, pin_key=pin_key, kind=kind)
    missing = [f for f in files if not (dest / f).is_file()]
    if missing:
        raise FetchError(f"download of {repo}@{commit} incomplete: {', '.join(missing[:5])}")
    if adapters:
        prune_adapters(dest, files)
    else:
        prune_weights(dest, files)
    write_atomic(dest / SOURCE_FILE, done.to_json())
    return done
