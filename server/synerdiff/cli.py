"""`synerdiff serve` runs the server; `synerdiff generate` is a small client for it; `synerdiff route`
runs the router in front of several servers (torch-free).

Settings precedence for `serve`: flags > SYNERDIFF_* environment variables > the config
file (--config or SYNERDIFF_CONFIG_FILE) > defaults. With no arguments it serves the
embedded tiny model on http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# argparse dest -> path in ServerSettings; only flags the user gave are applied.
SERVE_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("engine", "model"),
    "host": ("host",),
    "port": ("port",),
    "device": ("engine", "device"),
    "dtype": ("engine", "dtype"),
    "max_rows": ("engine", "scheduler", "max_rows"),
    "policy": ("engine", "scheduler", "policy"),
    "max_queue": ("engine", "limits", "max_queue"),
    "request_timeout": ("engine", "limits", "request_timeout_s"),
    "default_steps": ("engine", "default_steps"),
    "warmup": ("engine", "warmup"),
    "drain_timeout": ("drain_timeout_s",),
    "api_token_file": ("api_token_file",),
    "served_model_name": ("served_model_name",),
    "log_level": ("log_level",),
}


def _build_parser() -> argparse.ArgumentParser:
    from .contract.requests import SAMPLER_NAMES

    parser = argparse.ArgumentParser(
        prog="synerdiff",
        description="SynerDiff: text-to-image diffusion serving with step-level continuous batching.",
        epilog="Run `synerdiff COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the OpenAI-compatible HTTP server. Flags override SYNERDIFF_* environment variables, "
        "which override the config file, which overrides defaults. Without arguments: the embedded tiny model "
        "on http://127.0.0.1:8000. SIGTERM drains: readiness fails at once, in-flight requests finish "
        "(up to --drain-timeout seconds), then the process exits 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    s.add_argument("--config", metavar="FILE", help="JSON or YAML settings file (same as SYNERDIFF_CONFIG_FILE)")
    s.add_argument("--model", metavar="PATH", help="diffusers Stable-Diffusion directory (default: the embedded tiny model)")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8000)")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    s.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="weights dtype (default auto)")
    s.add_argument("--max-rows", type=int, metavar="N", help="most UNet rows per forward; a guided image is 2 rows")
    s.add_argument("--policy", choices=["synerdiff", "continuous"], help="scheduling policy")
    s.add_argument("--max-queue", type=int, metavar="N", help="most waiting requests before 429")
    s.add_argument("--request-timeout", type=float, metavar="S", help="per-request deadline in seconds, queue wait included")
    s.add_argument("--default-steps", type=int, metavar="N", help="steps when a request names none (0: 30 on CUDA, 20 on CPU)")
    s.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up generation before ready")
    s.add_argument("--drain-timeout", type=float, metavar="S", help="on SIGTERM, how long in-flight requests may take")
    s.add_argument("--api-token-file", metavar="FILE", help="file holding the bearer token required on /v1/*")
    s.add_argument("--served-model-name", metavar="NAME", help="model id reported by /v1/models")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    s.add_argument("--print-config", action="store_true", help="print the effective settings as JSON and exit")

    g = sub.add_parser(
        "generate",
        help="generate images with a running server",
        description="Ask a running SynerDiff server for images, showing per-step progress, and write PNGs. "
        "With --n > 1 the files are OUT-0.png, OUT-1.png, ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("prompt", help="what to draw")
    g.add_argument("-o", "--output", default="out.png", help="PNG path to write")
    g.add_argument("--url", default=os.environ.get("SYNERDIFF_URL", "http://127.0.0.1:8000"), help="server base URL (env SYNERDIFF_URL)")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, e.g. 64x64 (default: the model's native size)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible images")
    g.add_argument("--n", type=int, default=1, help="number of images")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the server's)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler (default: the server's)")
    g.add_argument("--token", default=os.environ.get("SYNERDIFF_API_TOKEN"), help="bearer token (env SYNERDIFF_API_TOKEN)")
    g.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--image", metavar="FILE", default=None, help="edit this picture (PNG, JPEG or WebP) instead of starting from noise")
    g.add_argument("--mask", metavar="PNG", default=None, help="with --image: repaint only the mask's fully transparent pixels")
    g.add_argument("--strength", type=float, default=None, help="with --image: share of the schedule that runs, 0-1 (default: 0.8)")

    r = sub.add_parser(
        "route",
        help="run the router in front of a pool's engines",
        description="Route images requests to the engine with the least outstanding work (UNet row-steps), "
        "preferring one already running the same shape; retry refusals that never started on another engine; "
        "buffer while no engine is ready; stream progress through. Engines come from --upstream URLs and/or "
        "--discover HOST:PORT (a headless Service's DNS name). Torch-free. SIGTERM drains.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--upstream", action="append", default=[], metavar="URL", help="an engine's base URL (repeatable)")
    r.add_argument("--discover", action="append", default=[], metavar="HOST:PORT", help="DNS name listing the engines, e.g. a headless Service (repeatable)")
    r.add_argument("--host", default=os.environ.get("SYNERDIFF_HOST", "127.0.0.1"), help="address to listen on")
    r.add_argument("--port", type=int, default=int(os.environ.get("SYNERDIFF_PORT", "8000")), help="port to listen on")
    r.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between polls of the engines' /readyz (and /metrics of an engine whose /readyz lacks its load)",
    )
    r.add_argument("--max-attempts", type=int, default=4, metavar="N", help="most sends of one request (refusals that never started are retried)")
    r.add_argument("--buffer-max", type=int, default=256, metavar="N", help="most requests held while no engine is ready")
    r.add_argument("--buffer-timeout", type=float, default=300.0, metavar="S", help="longest a request waits for a ready engine")
    r.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="longest an engine's answer may take")
    r.add_argument("--drain-timeout", type=float, default=330.0, metavar="S", help="on SIGTERM, how long requests in flight may take")
    r.add_argument("--drain-delay", type=float, default=0.0, metavar="S", help="on SIGTERM, seconds to keep serving new requests (not ready) before draining")
    r.add_argument("--default-steps", type=int, default=30, metavar="N", help="steps the engines use when a request names none (for costing)")
    r.add_argument(
        "--default-guidance",
        type=float,
        default=None,
        metavar="G",
        help="the engines' default guidance scale, for costing (default: what the engines publish in /readyz, else 7.5)",
    )
    r.add_argument("--tolerance", type=float, default=0.25, help="loads within this fraction count as close; then the engine running the same shape wins")
    r.add_argument(
        "--adapter-miss-cost",
        type=float,
        default=64.0,
        metavar="ROW_STEPS",
        help="load (in row-steps) one LoRA adapter of a request adds to an engine that does not hold it yet: an engine holding the "
        "request's adapters wins among comparable loads (0: ignore adapters)",
    )
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    f = sub.add_parser(
        "fetch",
        help="download a diffusers pipeline from the Hugging Face Hub, S3 or GCS: only what the engine loads, at a recorded version",
        description="Download the configs, tokenizers and one set of weights (the dtype's variant where the source has it) of the "
        "components the engine loads, and record what was fetched in DEST/.synerdiff-source.json: for hf:// the commit REVISION "
        "resolved to, for s3:// and gs:// each object's ETag or generation. With --pin-key, a folder already holding that key's "
        "download is reused without asking the source again. One process downloads into DEST at a time; others wait and reuse it. "
        "Credentials: HF_TOKEN (HF_ENDPOINT points at another Hub); for s3:// the AWS variables or the pod's identity; for gs:// "
        "GOOGLE_APPLICATION_CREDENTIALS or the pod's identity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    f.add_argument("uri", help="hf://org/name, s3://bucket/prefix or gs://bucket/prefix")
    f.add_argument("dest", help="folder to download into")
    f.add_argument("--revision", default="main", help="hf:// only: branch, tag or commit")
    f.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="picks the weights variant")
    f.add_argument("--pin-key", default="", help="reuse a download made under this key (a pool and its model spec) instead of asking the source again")
    f.add_argument("--endpoint-url", default=None, help="s3:// only: an S3-compatible store's endpoint, e.g. http://minio:9000")
    f.add_argument("--region", default=None, help="s3:// only: the bucket's region")
    f.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: never)")
    f.add_argument(
        "--adapters",
        action="store_true",
        help="the source is a folder of LoRA adapters, not a pipeline: download its NAME.safetensors and NAME/pytorch_lora_weights.safetensors "
        "files (the layout engine.lora.dir is read in) and remove adapters DEST holds that the source no longer has; --dtype is not used",
    )

    # The benchmark tools keep their own parsers; these entries forward to them.
    for name, text in (
        ("bench", "load benchmark: baselines and engine configs under Poisson load (see docs/bench.md)"),
        ("profile", "measure UNet/VAE/text-encoder costs on this device into a profile (the scheduler's cost model)"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    return parser


# ---------------------------------------------------------------------------------- serve
def settings_from_args(args: argparse.Namespace):
    from .contract.config import ServerSettings

    if getattr(args, "config", None):
        os.environ["SYNERDIFF_CONFIG_FILE"] = args.config
    init: dict[str, Any] = {}
    for dest, path in SERVE_FLAGS.items():
        if hasattr(args, dest):
            node = init
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = getattr(args, dest)
    return ServerSettings(**init)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"synerdiff serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        shown = settings.model_dump(mode="json")
        for secret in ("api_token", "admin_token"):
            if shown.get(secret):
                shown[secret] = "***"
        print(json.dumps(shown, indent=2))
        return 0
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    from .api.server import run_server

    logging.getLogger("synerdiff").info(
        "starting: model=%s device=%s policy=%s on %s:%d",
        settings.engine.model,
        settings.engine.device,
        settings.engine.scheduler.policy,
        settings.host,
        settings.port,
    )
    return run_server(settings)


# ---------------------------------------------------------------------------------- route
def _route(args: argparse.Namespace) -> int:
    from .router.app import RouterConfig
    from .router.decide import Defaults
    from .router.server import run_router

    if not args.upstream and not args.discover:
        print("synerdiff route: give at least one --upstream URL or --discover HOST:PORT", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    config = RouterConfig(
        upstreams=args.upstream,
        discover=args.discover,
        poll_interval_s=args.poll_interval,
        max_attempts=args.max_attempts,
        buffer_max=args.buffer_max,
        buffer_timeout_s=args.buffer_timeout,
        request_timeout_s=args.request_timeout,
        tolerance=args.tolerance,
        adapter_miss_cost=max(0.0, args.adapter_miss_cost),
        defaults=Defaults(steps=args.default_steps, guidance_scale=args.default_guidance),
    )
    logging.getLogger("synerdiff.router").info("routing on %s:%d to %s", args.host, args.port, ", ".join(args.upstream + args.discover))
    return run_router(config, args.host, args.port, drain_timeout_s=args.drain_timeout, drain_delay_s=args.drain_delay, log_level=args.log_level)


# ---------------------------------------------------------------------------------- generate
def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a text/event-stream; comments (pings) are skipped."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


def _progress(step: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * step / max(total, 1))
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] {step}/{total} steps  {time.monotonic() - started:5.1f}s")
    sys.stderr.flush()


def _output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500] or "no details"


def _extensions(args: argparse.Namespace) -> dict[str, Any]:
    """The request's optional fields that were given, by their API names."""
    fields = (
        ("size", args.size),
        ("num_inference_steps", args.steps),
        ("seed", args.seed),
        ("guidance_scale", args.guidance),
        ("negative_prompt", args.negative),
        ("sampler", args.sampler),
        ("strength", args.strength),
    )
    return {key: value for key, value in fields if value is not None}


def _edit_request(args: argparse.Namespace) -> dict[str, Any]:
    """POST /v1/images/edits as multipart; raises OSError when a file cannot be read."""
    data = {k: str(v) for k, v in {"prompt": args.prompt, "n": args.n, "stream": "true", **_extensions(args)}.items()}
    files = {"image": (Path(args.image).name, Path(args.image).read_bytes())}
    if args.mask is not None:
        files["mask"] = (Path(args.mask).name, Path(args.mask).read_bytes())
    return {"url": args.url.rstrip("/") + "/v1/images/edits", "data": data, "files": files}


def _generate(args: argparse.Namespace) -> int:
    """Generations (JSON) or, with --image, edits (multipart); both answered as an event stream."""
    import httpx

    if args.image is None and (args.mask is not None or args.strength is not None):
        print("synerdiff generate: --mask and --strength need --image", file=sys.stderr)
        return 2
    if args.image is not None:
        try:
            request = _edit_request(args)
        except OSError as exc:
            print(f"synerdiff generate: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 1
    else:
        request = {"url": args.url.rstrip("/") + "/v1/images/generations", "json": {"prompt": args.prompt, "n": args.n, "stream": True, **_extensions(args)}}
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = request["url"]
    paths = _output_paths(args.output, args.n)
    started = time.monotonic()
    written: list[Path] = []
    try:
        with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0)) as client:
            with client.stream("POST", headers=headers, **request) as resp:
                if resp.status_code != 200:
                    print(f"synerdiff generate: HTTP {resp.status_code}: {_error_message(resp.read())}", file=sys.stderr)
                    return 1
                for event, data in _sse_events(resp.iter_lines()):
                    payload = json.loads(data)
                    if event == "progress" and not args.quiet:
                        _progress(payload["step"], payload["total"], started)
                    elif event == "image":
                        path = paths[payload.get("index", len(written))]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(base64.b64decode(payload["b64_json"]))
                        written.append(path)
                    elif event == "error":
                        if not args.quiet:
                            sys.stderr.write("\n")
                        print(f"synerdiff generate: {payload['error']['message']}", file=sys.stderr)
                        return 1
                    elif event == "done":
                        info = payload.get("synerdiff", {})
                        if not args.quiet:
                            sys.stderr.write("\n")
                            print(
                                f"done in {time.monotonic() - started:.1f}s, seed {info.get('seed')}",
                                file=sys.stderr,
                            )
    except httpx.HTTPError as exc:
        print(f"\nsynerdiff generate: cannot complete the request to {url}: {exc}", file=sys.stderr)
        return 1
    if len(written) != args.n:
        print(f"synerdiff generate: the stream ended after {len(written)} of {args.n} image(s)", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Before anything loads torch: its OpenMP threads then sleep while idle instead of spinning,
    # which on shared or quota-limited CPUs slowed a lone request tenfold (engine/cpus.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "profile"):
        # The benchmark tools are their own distribution (bench/), not part of the runtime install.
        try:
            from synerdiff_bench.__main__ import main as bench_main
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] != "synerdiff_bench":
                raise
            print(
                f"synerdiff {argv[0]}: the benchmark tools (synerdiff-bench) are not installed; from a checkout "
                "of the repository run `pip install -e bench -e training` (scripts/setup-env.sh does it for "
                "the dev extra)",
                file=sys.stderr,
            )
            return 2

        # `synerdiff bench ARGS` = `python -m synerdiff_bench run ARGS`; `bench plot|smoke|build-model` pass through.
        rest = argv[1:]
        if argv[0] == "profile":
            rest = ["profile", *rest]
        elif not rest or rest[0] not in ("run", "plot", "smoke", "build-model", "profile"):
            rest = ["run", *rest]
        bench_main(rest)
        return 0
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "route":
        return _route(args)
    if args.command == "fetch":
        return _fetch(args)
    return _generate(args)


def _fetch(args: argparse.Namespace) -> int:
    import logging
    import threading
    from pathlib import Path

    from .models.fetch import FetchError, fetch, single_writer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scheme = args.uri.split("://", 1)[0] if "://" in args.uri else ""
    if scheme not in ("hf", "s3", "gs") or (scheme == "hf" and args.uri.count("/") != 3):
        print(f"synerdiff fetch: {args.uri!r} is not hf://org/name, s3://bucket/prefix or gs://bucket/prefix", file=sys.stderr)
        return 2
    if scheme != "s3" and (args.endpoint_url or args.region):
        print("synerdiff fetch: --endpoint-url and --region apply to s3:// only", file=sys.stderr)
        return 2
    if scheme != "hf" and args.revision != "main":
        print("synerdiff fetch: --revision applies to hf:// only (an object store's objects are fetched as they are)", file=sys.stderr)
        return 2
    timer = None
    if args.timeout > 0:
        # A hung download must end the init container with a message, not hold the pod until its
        # start-up deadline; a timer thread can end the process while the main thread is inside a
        # native download that no signal handler would interrupt.
        def expired() -> None:
            print(f"synerdiff fetch: the download did not finish within {args.timeout:g} s", file=sys.stderr, flush=True)
            os._exit(1)

        timer = threading.Timer(args.timeout, expired)
        timer.daemon = True
        timer.start()
    try:
        # A lock holder that outlives half the deadline (a crashed node's NFS lock): go on without it.
        with single_writer(Path(args.dest), wait_s=args.timeout / 2 if args.timeout > 0 else None) as locked:
            if scheme == "hf":
                done = fetch(
                    args.uri.removeprefix("hf://"),
                    args.revision,
                    args.dest,
                    args.dtype,
                    pin_key=args.pin_key,
                    token=os.environ.get("HF_TOKEN") or None,
                    adapters=args.adapters,
                )
            else:
                from .models.objectstore import fetch_objects

                done = fetch_objects(
                    args.uri,
                    args.dest,
                    args.dtype,
                    pin_key=args.pin_key,
                    endpoint_url=args.endpoint_url,
                    region=args.region,
                    locked=locked,
                    adapters=args.adapters,
                )
    except FetchError as exc:
        print(f"synerdiff fetch: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # DEST cannot be created or locked
        print(f"synerdiff fetch: {args.dest}: {exc}", file=sys.stderr)
        return 1
    finally:
        if timer is not None:
            timer.cancel()
    verb = "already held" if done.reused else "downloaded"
    if scheme == "hf":
        print(f"{done.repo}@{done.commit} ({done.revision}): {len(done.files)} files {verb} in {args.dest}")
    else:
        print(f"{done.repo} (listing {done.commit[:12]}): {len(done.files)} files {verb} in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
