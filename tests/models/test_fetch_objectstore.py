"""`synerdiff fetch` from s3:// and gs:// against real servers on loopback: moto's S3 server and the
GCS emulator, reached through fsspec's s3fs and gcsfs as in a pod (the CLI in a subprocess)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import boto3
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from gcp_storage_emulator.server import create_server
from gcsfs.core import GCSFileSystem
from moto import settings as moto_settings
from moto.server import ThreadedMotoServer

from synerdiff.models.fetch import SOURCE_FILE, FetchError, forget, recorded
from synerdiff.models.loader import load_model
from synerdiff.models.objectstore import parse_object_uri
from synerdiff_operator.spec import OBJECT_URI

from .test_fetch import ADAPTERS, adapter_folder, published_pipeline

BUCKET = "models"
PREFIX = "sd/tiny-sd"
LOADED = ("unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/")
KEY_ID, SECRET = "AKIAEXAMPLEEXAMPLE01", "secret-example-example-example-example-0"


def expected_files(root: Path) -> set[str]:
    """What the engine loads in float16: every loaded component's files, the UNet's in its fp16 variant only."""
    everything = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    plain_unet = {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"}
    return {f for f in everything if f.startswith(LOADED)} - plain_unet | {"model_index.json"}


class _Requests(logging.Handler):
    """Request lines a server logs, e.g. 'GET /models/sd/tiny-sd/unet/config.json HTTP/1.1'."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Store:
    scheme: str
    root: Path  # the pipeline's files, as uploaded
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    requests: _Requests = field(default_factory=_Requests)
    client: Any = None

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{BUCKET}/{PREFIX}"

    def gets(self) -> list[str]:
        """Objects downloaded since the last clear, relative to the prefix."""
        pattern = re.compile(rf'"GET /(?:download/storage/v1/b/)?{BUCKET}/(?:o/)?{re.escape(PREFIX)}/([^ ?]+)')
        return [m.group(1) for line in self.requests.lines if (m := pattern.search(unquote(line)))]

    def fetch(self, dest: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", self.uri, str(dest), *self.args, *args]
        return subprocess.run(cmd, env={**os.environ, **self.env, **(env or {})}, capture_output=True, text=True, timeout=120)

    def start(self, *args: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", self.uri, *args, *self.args]
        return subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _s3_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull}


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Store]:
    root = tmp_path / "pipeline"
    published_pipeline(root)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=BUCKET)
    for f in root.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{PREFIX}/{f.relative_to(root)}")
    client.put_object(Bucket=BUCKET, Key="sd/other-model/model_index.json", Body=b"{}")  # a neighbour under another prefix
    store = Store("s3", root, _s3_env(), ["--endpoint-url", url, "--region", "us-east-1"], client=client)
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(store.requests)
    werkzeug.setLevel(logging.INFO)
    yield store
    werkzeug.removeHandler(store.requests)
    server.stop()


@pytest.fixture
def gs(tmp_path: Path, free_port) -> Iterator[Store]:
    root = tmp_path / "pipeline"
    published_pipeline(root)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    fs = GCSFileSystem(token="anon", endpoint_url=env["STORAGE_EMULATOR_HOST"], skip_instance_cache=True)
    fs.mkdir(BUCKET)
    fs.put(f"{root}/", f"{BUCKET}/{PREFIX}/", recursive=True)
    store = Store("gs", root, env, client=fs)
    emulator = logging.getLogger("gcp_storage_emulator.server")
    emulator.addHandler(store.requests)
    emulator.setLevel(logging.INFO)
    yield store
    emulator.removeHandler(store.requests)
    server.stop()


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(request.param)


def test_only_what_the_engine_loads_is_downloaded_and_the_versions_are_recorded(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    proc = store.fetch(dest, "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    want = expected_files(store.root)
    held = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".synerdiff-")}
    assert held == want  # no fp32 UNet, .bin, safety checker, root checkpoint, ONNX, README, nor the other prefix's files
    assert set(store.gets()) == want and len(store.gets()) == len(want)  # each object fetched once (model_index.json too)
    source = json.loads((dest / SOURCE_FILE).read_text())
    assert source["repo"] == store.uri and source["dtype"] == "float16" and set(source["files"]) == want
    assert re.fullmatch(r"[0-9a-f]{64}", source["commit"])  # a digest of the listing stands for a commit
    assert set(source["versions"]) == want and all(source["versions"].values())
    if store.scheme == "s3":
        head = store.client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/unet/config.json")
        assert source["versions"]["unet/config.json"] == head["ETag"].strip('"')
    else:
        assert source["versions"]["unet/config.json"] == str(store.client.info(f"{BUCKET}/{PREFIX}/unet/config.json")["generation"])
    assert f"{store.uri} (listing {source['commit'][:12]}): {len(want)} files downloaded" in proc.stdout
    model = load_model(dest, "cpu", "float32")  # whole files: the pipeline loads
    assert model.family


def test_a_pinned_download_is_reused_and_a_changed_object_is_fetched_again(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    assert store.fetch(dest, "--pin-key", "pool-uid/7").returncode == 0
    inodes = {p: p.stat().st_ino for p in dest.rglob("*") if p.is_file()}
    store.requests.lines.clear()
    again = store.fetch(dest, "--pin-key", "pool-uid/7")
    assert again.returncode == 0, again.stderr
    assert "already held" in again.stdout
    assert store.requests.lines == []  # not even a listing
    assert {p: p.stat().st_ino for p in dest.rglob("*") if p.is_file()} == inodes
    # A new pin key lists the prefix again and downloads only the object that changed.
    changed = f"{PREFIX}/scheduler/scheduler_config.json"
    config = json.loads((store.root / "scheduler" / "scheduler_config.json").read_text())
    body = json.dumps({**config, "steps_offset": 1}).encode()
    if store.scheme == "s3":
        store.client.put_object(Bucket=BUCKET, Key=changed, Body=body)
    else:
        store.client.pipe_file(f"{BUCKET}/{changed}", body)
    before = json.loads((dest / SOURCE_FILE).read_text())
    newer = store.fetch(dest, "--pin-key", "pool-uid/8")
    assert newer.returncode == 0, newer.stderr
    assert store.gets() == ["scheduler/scheduler_config.json"]
    after = json.loads((dest / SOURCE_FILE).read_text())
    assert after["pin_key"] == "pool-uid/8" and after["commit"] != before["commit"]
    assert after["versions"]["scheduler/scheduler_config.json"] != before["versions"]["scheduler/scheduler_config.json"]
    assert json.loads((dest / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1


def test_a_folder_a_fetch_left_half_updated_is_not_reused_by_its_old_pin(s3: Store, tmp_path: Path) -> None:
    """A fetch that changes files first leaves a record no pinned fetch reuses and that names only
    the files it keeps; if it dies there, the old pin downloads what changed instead of serving a mix."""
    dest = tmp_path / "model"
    assert s3.fetch(dest, "--pin-key", "pool-a").returncode == 0
    before = json.loads((dest / SOURCE_FILE).read_text())
    changed = "scheduler/scheduler_config.json"
    body = json.dumps({**json.loads((s3.root / changed).read_text()), "steps_offset": 1}).encode()
    s3.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{changed}", Body=body)
    # What a fetch under another pin leaves when it dies right after replacing that file.
    forget(dest, recorded(dest), keep=[f for f in before["files"] if f != changed])
    (dest / changed).write_bytes(body)
    left = json.loads((dest / SOURCE_FILE).read_text())
    assert left["pin_key"] == "" and changed not in left["files"] and changed not in left["versions"]
    s3.requests.lines.clear()
    again = s3.fetch(dest, "--pin-key", "pool-a")
    assert again.returncode == 0, again.stderr
    assert "already held" not in again.stdout and s3.gets() == [changed]
    after = json.loads((dest / SOURCE_FILE).read_text())
    assert after["pin_key"] == "pool-a" and after["commit"] != before["commit"] and sorted(after["files"]) == sorted(before["files"])


def test_weights_an_earlier_listing_chose_are_removed(s3: Store, tmp_path: Path) -> None:
    """The loader picks a variant by what a folder holds: after a fetch for float16 the float32
    UNet weights fetched before are gone, so the fp16 ones the record names are what loads."""
    dest = tmp_path / "model"
    assert s3.fetch(dest, "--dtype", "float32", "--pin-key", "pool-a").returncode == 0
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    newer = s3.fetch(dest, "--dtype", "float16", "--pin-key", "pool-b")
    assert newer.returncode == 0, newer.stderr
    assert not (dest / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (dest / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".")} == expected_files(s3.root)


def test_pods_sharing_a_claim_download_once(s3: Store, tmp_path: Path) -> None:
    dest = tmp_path / "claim"
    procs = [s3.start(str(dest), "--pin-key", "pool-uid/7") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert sorted("already held" in out for out, _ in outs) == [False, True], outs  # one writer; the other reused its work
    assert len(s3.gets()) == len(expected_files(s3.root))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"{{scheme}}://no-such-bucket/{PREFIX}", "{scheme}://no-such-bucket/sd/tiny-sd: bucket 'no-such-bucket' does not exist"),
        (f"{{scheme}}://{BUCKET}/sd/missing", f"{{scheme}}://{BUCKET}/sd/missing: no objects under this prefix"),
        (f"{{scheme}}://{BUCKET}/sd/tiny-sd/unet", f"{{scheme}}://{BUCKET}/sd/tiny-sd/unet has no model_index.json: not a diffusers pipeline folder"),
    ],
    ids=["missing-bucket", "missing-prefix", "no-model-index"],
)
def test_a_missing_source_is_a_clear_error(store: Store, tmp_path: Path, uri: str, message: str) -> None:
    cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", uri.format(scheme=store.scheme), str(tmp_path / "model"), *store.args]
    proc = subprocess.run(cmd, env={**os.environ, **store.env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"synerdiff fetch: {message.format(scheme=store.scheme)}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model" / SOURCE_FILE).exists()


def test_s3_credentials_are_the_ones_given(s3: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With authentication on, moto checks the key id and the request signature against its IAM users."""
    iam = boto3.client("iam", endpoint_url=s3.args[1], region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    good = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    ok = s3.fetch(tmp_path / "model", env=good)
    assert ok.returncode == 0, ok.stderr
    wrong = s3.fetch(tmp_path / "other", env={**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert wrong.returncode == 1 and f"synerdiff fetch: could not download {s3.uri}" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class _TokenEndpoint(BaseHTTPRequestHandler):
    """OAuth's token endpoint, as a service-account key's token_uri names it: it takes a signed JWT
    (grant type jwt-bearer) and answers with an access token."""

    assertions: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        type(self).assertions.append(form["assertion"][0])
        body = json.dumps({"access_token": "token-for-reader", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_gs_service_account_key_signs_the_token_request(gs: Store, tmp_path: Path) -> None:
    """The key file in GOOGLE_APPLICATION_CREDENTIALS is what the download authenticates with: its
    private key signs the assertion the token endpoint receives, for its client_email."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    _TokenEndpoint.assertions = []
    try:
        key = tmp_path / "key.json"
        email = "reader@project.iam.gserviceaccount.com"
        info = {"type": "service_account", "project_id": "project", "private_key_id": "k1", "private_key": pem, "client_email": email}
        key.write_text(json.dumps({**info, "client_id": "1", "token_uri": f"http://127.0.0.1:{tokens.server_address[1]}/token"}))
        proc = gs.fetch(tmp_path / "model", env={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
        assert proc.returncode == 0, proc.stderr
    finally:
        tokens.shutdown()
        tokens.server_close()
    assert _TokenEndpoint.assertions, "the download never asked for a token"
    header, claims, signature = _TokenEndpoint.assertions[0].split(".")
    assert json.loads(unb64(claims))["iss"] == email
    private.public_key().verify(unb64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())  # raises if not ours


def test_a_gs_key_file_that_is_not_a_key_is_refused_by_name(gs: Store, tmp_path: Path) -> None:
    """A key file that cannot be used fails by name instead of falling back to anonymous access."""
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "reader@example.iam.gserviceaccount.com"}))
    proc = gs.fetch(tmp_path / "model", env={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    assert proc.returncode == 1 and f"synerdiff fetch: GOOGLE_APPLICATION_CREDENTIALS={key}: not a usable service-account key" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and gs.gets() == []


@pytest.mark.parametrize(
    ("uri", "args", "message"),
    [
        ("s3://Bad_Bucket/x", [], "is not s3://bucket/prefix or gs://bucket/prefix"),
        ("s3://bucket/../etc", [], "is not s3://bucket/prefix or gs://bucket/prefix"),
        ("gs://bucket/x", ["--endpoint-url", "http://127.0.0.1:1"], "--endpoint-url and --region apply to s3:// only"),
        ("s3://bucket/x", ["--revision", "v2"], "--revision applies to hf:// only"),
    ],
)
def test_bad_object_store_arguments_are_refused_by_name(tmp_path: Path, uri: str, args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", uri, str(tmp_path / "model"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/sd15",
        "gs://my.models_1/a/b-c/d=e",
        "s3://models",
        "s3://Models/x",
        "s3://m/x",
        "s3://models/../x",
        "gs://models/a//b",
        "gs://models/x/",
        "s3://models/.x",
    ],
)
def test_the_fetch_and_the_pool_spec_accept_the_same_uris(uri: str) -> None:
    """The operator's schema (spec.OBJECT_URI) and the fetch's parser are written apart (neither package imports the other)."""
    try:
        parse_object_uri(uri)
        parsed = True
    except FetchError:
        parsed = False
    assert parsed == bool(re.match(OBJECT_URI, uri))


def test_a_folder_of_adapters_is_fetched_reused_and_kept_in_step_with_the_store(store: Store, tmp_path: Path) -> None:
    """`synerdiff fetch --adapters` (spec.adapters' init container): the adapters only, reused by its pin, and an
    adapter deleted from the store leaves the folder at the next fetch."""
    root = tmp_path / "loras"
    adapter_folder(root)
    prefix = "loras/sd15"
    for f in root.rglob("*"):
        if f.is_file():
            key = f"{BUCKET}/{prefix}/{f.relative_to(root)}"
            if store.scheme == "s3":
                store.client.put_object(Bucket=BUCKET, Key=key.split("/", 1)[1], Body=f.read_bytes())
            else:
                store.client.pipe(key, f.read_bytes())
    uri, dest = f"{store.scheme}://{BUCKET}/{prefix}", tmp_path / "adapters"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", uri, str(dest), "--adapters", *store.args, *args]
        return subprocess.run(cmd, env={**os.environ, **store.env}, capture_output=True, text=True, timeout=120)

    first = run("--pin-key", "pool/1")
    assert first.returncode == 0, first.stderr
    held = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert held == ADAPTERS
    rec = recorded(dest)
    assert rec is not None and rec.kind == "adapters" and set(rec.versions) == ADAPTERS
    assert (dest / "style-a.safetensors").read_bytes() == (root / "style-a.safetensors").read_bytes()
    again = run("--pin-key", "pool/1")
    assert again.returncode == 0 and "already held" in again.stdout
    if store.scheme == "s3":
        store.client.delete_object(Bucket=BUCKET, Key=f"{prefix}/style-a.safetensors")
    else:
        store.client.rm(f"{BUCKET}/{prefix}/style-a.safetensors")
    later = run()
    assert later.returncode == 0, later.stderr
    assert not (dest / "style-a.safetensors").exists() and (dest / "style-b" / "pytorch_lora_weights.safetensors").is_file()
    # A prefix without adapters (the pipeline's) is refused by name.
    cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", store.uri, str(tmp_path / "none"), "--adapters", *store.args]
    proc = subprocess.run(cmd, env={**os.environ, **store.env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "holds no adapters" in proc.stderr, proc.stderr
