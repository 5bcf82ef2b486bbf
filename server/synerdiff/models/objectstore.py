"""Download a diffusers pipeline from an S3 or GCS prefix: only the files the engine loads, at recorded versions.

`s3://bucket/prefix` and `gs://bucket/prefix` name a folder laid out as a diffusers pipeline
(`model_index.json` at its root). fsspec does the object-store work (s3fs over botocore, gcsfs over
the GCS JSON API: signing, retries, credentials chains); this module lists the prefix once, picks the
files with `pipeline_files` as for the Hub, and downloads each to a temporary name beside its final
one before renaming it into place, so a reader never sees half a file.

An object store has no commit: what stands for one is a digest of the chosen objects' names, sizes
and versions (S3 ETags, GCS generations), recorded with the versions themselves in `SOURCE_FILE`.
A later fetch with the same pin key reuses a complete folder without listing the bucket; without
one, it lists the bucket and downloads again only objects whose version changed.

Credentials come from each library's usual places: for S3 the AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a web-identity token (IRSA) or the instance role; for GCS
the key file in GOOGLE_APPLICATION_CREDENTIALS, else the pod's own identity (Workload Identity).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fetch import ADAPTER_FILE, SOURCE_FILE, Fetched, FetchError, adapter_files, complete, forget, pipeline_files, prune_adapters, prune_weights, recorded
from .files import write_atomic

log = logging.getLogger("synerdiff.fetch")

OBJECT_URI = re.compile(r"^(s3|gs)://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])((?:/[A-Za-z0-9_=+@,-][A-Za-z0-9._=+@,-]*)*)$")
PARTIAL_SUFFIX = ".synerdiff-partial"  # a download in progress; removed by the next fetch into the folder


@dataclass(frozen=True)
class ObjectURI:
    scheme: str  # s3 or gs
    bucket: str
    prefix: str  # without leading or trailing slash; "" for the bucket's root

    @property
    def root(self) -> str:
        """The prefix as fsspec names it: bucket/prefix."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.root}"


def parse_object_uri(uri: str) -> ObjectURI:
    m = OBJECT_URI.match(uri)
    if m is None:
        raise FetchError(f"{uri!r} is not s3://bucket/prefix or gs://bucket/prefix (prefix segments may not start with a dot)")
    return ObjectURI(m.group(1), m.group(2), m.group(3).strip("/"))


def filesystem(src: ObjectURI, *, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """The fsspec filesystem for `src`'s store, with credentials from the environment."""
    if src.scheme == "s3":
        import s3fs

        client_kwargs = {"region_name": region} if region else {}
        # endpoint_url: an S3-compatible store (MinIO, Ceph, R2); unset, AWS (or AWS_ENDPOINT_URL).
        return s3fs.S3FileSystem(endpoint_url=endpoint_url, client_kwargs=client_kwargs, skip_instance_cache=True)
    if endpoint_url or region:
        raise FetchError("--endpoint-url and --region apply to s3:// only")
    # The core JSON-API filesystem: gcsfs's default class first probes the bucket's layout over gRPC.
    from gcsfs.core import GCSFileSystem

    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        # Given explicitly, a bad key fails here by name instead of falling back to anonymous access.
        try:
            return GCSFileSystem(token=key_file, skip_instance_cache=True)
        except Exception as exc:
            raise FetchError(f"GOOGLE_APPLICATION_CREDENTIALS={key_file}: not a usable service-account key ({type(exc).__name__}: {exc})") from exc
    # An emulator takes no credentials; otherwise the pod's identity (metadata server), else anonymous for a public bucket.
    return GCSFileSystem(token="anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None, skip_instance_cache=True)


def object_version(scheme: str, info: dict[str, Any]) -> str:
    """What identifies one state of an object: its GCS generation, or its S3 ETag."""
    value = info.get("generation") if scheme == "gs" else info.get("ETag") or info.get("etag")
    return str(value or "").strip('"')


def listing_digest(versions: dict[str, str], sizes: dict[str, int]) -> str:
    """Stands for a commit: names, sizes and versions of the chosen objects (64 hex digits)."""
    body = json.dumps([[name, sizes[name], versions[name]] for name in sorted(versions)], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _remove_partials(dest: Path) -> None:
    """Downloads a dead fetch left, at the depths a pipeline's files lie (the folder and its
    component folders; deeper ones may be another pool's folder)."""
    for pattern in (f"*{PARTIAL_SUFFIX}", f"*/*{PARTIAL_SUFFIX}"):
        for stale in dest.glob(pattern):
            stale.unlink(missing_ok=True)


def _list(fs: Any, src: ObjectURI) -> dict[str, dict[str, Any]]:
    """Objects under the prefix, by path relative to it."""
    try:
        found = fs.find(src.root, detail=True)
    except FileNotFoundError as exc:
        raise FetchError(f"{src}: bucket {src.bucket!r} does not exist (or these credentials cannot see it)") from exc
    if not found:
        raise FetchError(f"{src}: no objects under this prefix")
    start = len(src.root) + 1
    return {path[start:]: info for path, info in found.items() if info.get("type", "file") == "file" and path.startswith(src.root + "/")}


def _download(fs: Any, src: ObjectURI, name: str, dest: Path, size: int) -> None:
    """One object to dest/name, by way of a temporary name beside it: readers see the old file or the whole new one."""
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: a writer without the folder's lock never shares a partial file with another.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    partial = Path(tmp)
    try:
        fs.get_file(f"{src.root}/{name}", str(partial))
        got = partial.stat().st_size
        if got != size:
            raise FetchError(f"{src}/{name}: downloaded {got} bytes where the listing said {size}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def fetch_objects(
    uri: str,
    dest: str | Path,
    dtype: str = "float16",
    *,
    pin_key: str = "",
    endpoint_url: str | None = None,
    region: str | None = None,
    locked: bool = True,
    adapters: bool = False,
) -> Fetched:
    """Download what the engine loads of the pipeline at `uri` into `dest` (with `adapters`, the
    folder's LoRA adapters, as `fetch.adapter_files` picks them); see the module doc."""
    src = parse_object_uri(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    kind = "adapters" if adapters else "pipeline"
    rec = recorded(dest)
    same = rec is not None and rec.repo == str(src) and rec.dtype == dtype and rec.kind == kind and complete(dest, rec)
    if same and rec is not None and pin_key and rec.pin_key == pin_key:
        log.info("%s already holds %s at %s (%d files); nothing to download", dest, src, rec.commit[:12], len(rec.files))
        rec.reused = True
        return rec
    if locked:  # without the lock, another writer's downloads may be under way
        _remove_partials(dest)
    try:
        fs = filesystem(src, endpoint_url=endpoint_url, region=region)
        listing = _list(fs, src)
        if adapters and not adapter_files(list(listing)):
            raise FetchError(f"{src} holds no adapters (NAME.safetensors, or NAME/{ADAPTER_FILE})")
        if not adapters and "model_index.json" not in listing:
            raise FetchError(f"{src} has no model_index.json: not a diffusers pipeline folder")
        held = rec.versions if same and rec is not None else {}

        def needed(name: str) -> bool:
            info = listing[name]
            version, size = object_version(src.scheme, info), int(info.get("size") or 0)
            return not (version and held.get(name) == version and (dest / name).is_file() and (dest / name).stat().st_size == size)

        # The index first: it says which components, and so which files, to download.
        fetched = ["model_index.json"] if not adapters and needed("model_index.json") else []
        if fetched:
            forget(dest, rec, keep=[f for f in held if f != "model_index.json"])
            _download(fs, src, "model_index.json", dest, int(listing["model_index.json"].get("size") or 0))
        files = adapter_files(list(listing)) if adapters else pipeline_files(json.loads((dest / "model_index.json").read_text()), list(listing), dtype)
        versions = {f: object_version(src.scheme, listing[f]) for f in files}
        commit = listing_digest(versions, {f: int(listing[f].get("size") or 0) for f in files})
        todo = [f for f in files if f != "model_index.json" and needed(f)]
        if todo and not fetched:
            forget(dest, rec, keep=[f for f in held if f not in todo])
        log.info("downloading %d of %d files of %s (%s; %d already held)", len(todo), len(listing), src, dtype, len(files) - len(todo) - len(fetched))
        for k, name in enumerate(todo):
            _download(fs, src, name, dest, int(listing[name].get("size") or 0))
            log.info("file %d of %d: %s", k + 1, len(todo), name)
        fetched += todo
    except FetchError:
        raise
    except Exception as exc:  # the store's errors, its transport's, credentials, a full disk, a bad index: one message
        raise FetchError(f"could not download {src}: {type(exc).__name__}: {exc}") from exc
    done = Fetched(repo=str(src), revision="", commit=commit, dtype=dtype, files=files, pin_key=pin_key, versions=versions, kind=kind)
    done.reused = not fetched
    if adapters:
        prune_adapters(dest, files)
    else:
        prune_weights(dest, files)
    write_atomic(dest / SOURCE_FILE, done.to_json())
    return done
