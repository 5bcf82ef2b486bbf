"""python -m synerdiff_bench {build-model,profile,run,smoke,plot} ...

build-model  write the SD1.5-shaped random-weight model to a folder
profile      offline profiler -> a cost_model.Profile JSON
run          open-loop load sweep over --rates for --systems -> OUT/NAME.json
smoke        ≥ 32 concurrent mixed requests through the engine -> OUT/NAME.json
scale        N servers, one per GPU, behind round-robin, against one GPU -> OUT/NAME.json
fastpath     the compiled fast path against diffusers eager/compiled: start-up, lone, saturated -> OUT/fastpath.json
plot         a sweep JSON -> PNG (needs matplotlib; run it off the GPU machine)
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (embedded), 'sd15' or 'sdxl' (build/reuse the shaped random-weight model in --model-dir) or a diffusers directory",
    )
    p.add_argument("--model-dir", default=None, help="where --model sd15/sdxl is built (default /tmp/synerdiff-<shape>)")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])


def _out_args(p: argparse.ArgumentParser, name: str) -> None:
    from .report import DEFAULT_OUT

    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (on the GPU machine: $OUT)")
    p.add_argument("--name", default=name, help="result file stem: OUT/NAME.json")


def _system_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--systems", default=default, help="comma-separated builtins (diffusers, static, continuous, synerdiff) or names defined by --system")
    p.add_argument(
        "--system",
        action="append",
        default=[],
        metavar="NAME:k=v,...",
        help="define a system, e.g. cont-b32:policy=continuous,max_rows=32 or st16:kind=static,batch=16,wait=2 or srv:kind=http,url=http://host:8000",
    )
    p.add_argument("--profile-path", default=None, help="profile JSON given to every engine system (EngineConfig.profile_path)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m synerdiff_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-model", help="write the SD1.5-, SDXL-, SD3-medium- or FLUX.1-dev-shaped random-weight model")
    b.add_argument("out", nargs="?", default=None)
    b.add_argument("--shape", default="sd15", choices=["sd15", "sdxl", "sd3", "flux"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")

    p = sub.add_parser("profile", help="offline profiler -> Profile JSON")
    _model_args(p)
    p.add_argument("--sizes", default=None, help="HxW list, e.g. 512x512,384x640 (default: the model's size)")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--vae-chunks", default="1,2,4,8,16")
    p.add_argument("--encode-prompts", default="1,2,4,8,16,32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--fast-path",
        default="auto",
        choices=["auto", "on", "off", "graphs"],
        help="time the compiled CUDA-graph UNet the engine uses by default (auto: on with CUDA); graphs: uncompiled CUDA graphs",
    )
    p.add_argument("-o", "--output", default="profile.json")

    r = sub.add_parser("run", help="open-loop load sweep")
    _model_args(r)
    _system_args(r, "diffusers,static,continuous")
    _out_args(r, "sweep")
    r.add_argument("--rates", default="0.5,1,2,3,4", help="offered loads, requests/s")
    r.add_argument("--mix", default="default", choices=["default", "mixed"])
    r.add_argument("--size", default="512x512", help="default mix: HxW")
    r.add_argument("--steps", type=int, default=50, help="default mix: steps")
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--mixed-sizes", default="512x512,384x640")
    r.add_argument("--mixed-steps", default="20-50", help="mixed mix: inclusive step range")
    r.add_argument("--duration", type=float, default=20.0, help="measured arrival window per rate, seconds")
    r.add_argument("--warmup-s", type=float, default=2.0, help="arrivals before the window: load, not statistics")
    r.add_argument("--max-requests", type=int, default=None, help="at most this many measured requests per rate")
    r.add_argument("--slo", type=float, default=None, help="fixed SLO in seconds (default: --slo-factor x lone-request latency)")
    r.add_argument("--slo-factor", type=float, default=3.0)
    r.add_argument("--cut-factor", type=float, default=4.0, help="give up on a point once a request waits this many SLOs")
    r.add_argument("--budget-s", type=float, default=None, help="wall-time budget for the sweep; later points are skipped")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--arrival-draw",
        default="shared",
        choices=["shared", "per-rate"],
        help="shared: every rate replays one draw of --seed, compressed (common random numbers); per-rate: an independent draw per rate (how the committed *-run1 to *-run4 results were drawn)",
    )
    r.add_argument("--lone-repeats", type=int, default=2, help="lone-request runs per size; the fastest counts")
    r.add_argument("--progress-s", type=float, default=10.0)
    r.add_argument("--no-raw", action="store_true", help="leave per-request rows out of the JSON")

    s = sub.add_parser("smoke", help="≥ 32 concurrent mixed requests through the engine")
    _model_args(s)
    _system_args(s, "continuous")
    _out_args(s, "smoke")
    s.add_argument("--requests", type=int, default=40)
    s.add_argument("--size", default="512x512")
    s.add_argument("--steps-choices", default="20,30,50")
    s.add_argument("--guidance-choices", default="1.0,5.0,7.5")
    s.add_argument("--samplers", default="ddim,euler,euler_a,dpmpp_2m")
    s.add_argument("--stagger-s", type=float, default=0.5)
    s.add_argument("--check-exact", type=int, default=2, help="compare this many images with diffusers' pipeline run alone")
    s.add_argument("--seed", type=int, default=0)

    o = sub.add_parser("overlap", help="does a VAE decode overlap a UNet step on two CUDA streams?")
    _model_args(o)
    _out_args(o, "overlap")
    o.add_argument("--rows", default="2,4,8,16,32", help="UNet rows per step")
    o.add_argument("--images", default="1,4", help="images per decode")
    o.add_argument("--repeats", type=int, default=10)

    from .scaling import add_parser as add_scale_parser

    add_scale_parser(sub)

    pl = sub.add_parser("plot", help="sweep JSON(s) -> PNG")
    pl.add_argument("json", nargs="+", help="one sweep, or several of one load (their systems are drawn together)")
    pl.add_argument("-o", "--output", default=None)
    return ap


def _resolve(args: argparse.Namespace) -> str:
    from .sdmodels import resolve_model

    return resolve_model(args.model, args.model_dir, seed=args.model_seed, device=args.device)


def _load(args: argparse.Namespace):
    from synerdiff.models.loader import load_model

    path = _resolve(args)
    return path, load_model(path, args.device, args.dtype)


class _ModelCopies:
    """One copy of the weights per `weights_key`: the engine's fast path converts its UNet to
    channels_last and graphs it, which must not leak into the eager baselines' copy."""

    def __init__(self, path: str, device: str, dtype: str):
        self.path, self.device, self.dtype = path, device, dtype
        self._copies: dict[str, object] = {}

    def get(self, key: str | None):
        from synerdiff.models.loader import load_model

        if key is None:
            return None
        if key not in self._copies:
            self._copies[key] = load_model(self.path, self.device, self.dtype)
        return self._copies[key]


def _specs(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    from .baselines import parse_spec

    defined = dict(parse_spec(t) for t in args.system)
    order = [n.strip() for n in args.systems.split(",") if n.strip()]
    names = order + [n for n in defined if n not in order]
    return [(n, defined[n]) if n in defined else parse_spec(n) for n in names]


def cmd_build_model(args: argparse.Namespace) -> None:
    from .sdmodels import resolve_model

    print(resolve_model(args.shape, args.out, seed=args.seed, device=args.device))


def cmd_profile(args: argparse.Namespace) -> None:
    from synerdiff.engine.executor import StepExecutor
    from synerdiff.engine.profiler import parse_sizes, profile_executor

    path, model = _load(args)
    executor = StepExecutor(model)
    sizes = parse_sizes(args.sizes) if args.sizes else [(model.default_size, model.default_size)]
    if args.fast_path in ("on", "graphs") or (args.fast_path == "auto" and model.device.type == "cuda"):
        from synerdiff.contract.config import EngineConfig, SchedulerConfig

        fast = EngineConfig(scheduler=SchedulerConfig(max_rows=args.max_rows), fast_path_compile=args.fast_path != "graphs")
        executor.enable_fast_path(fast, sizes)
    prof = profile_executor(
        executor,
        path,
        sizes=sizes,
        max_rows=args.max_rows,
        vae_chunks=tuple(int(x) for x in args.vae_chunks.split(",")),
        encode_prompts=tuple(int(x) for x in args.encode_prompts.split(",")),
        warmup=args.warmup,
        repeats=args.repeats,
        progress=True,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    prof.save(args.output)
    print(f"profile for {prof.gpu} / {prof.dtype} / fast path {prof.fast_path} written to {args.output}")


def cmd_run(args: argparse.Namespace) -> None:
    from synerdiff.engine.profiler import parse_sizes

    from .baselines import bench_engine_config, build_system, weights_key
    from .report import new_report, result_path, write_json
    from .sweep import SweepConfig, run_sweep
    from .workload import default_mix, mixed_mix

    specs = _specs(args)
    path = _resolve(args) if any(o.get("kind") != "http" for _, o in specs) else args.model
    if args.mix == "default":
        mix = default_mix(parse_sizes(args.size)[0], args.steps, args.guidance)
    else:
        lo, _, hi = args.mixed_steps.partition("-")
        mix = mixed_mix(tuple(parse_sizes(args.mixed_sizes)), (int(lo), int(hi or lo)), args.guidance)
    base = bench_engine_config(path, args.device, args.dtype, args.profile_path)
    models = _ModelCopies(path, args.device, args.dtype)
    systems = [build_system(n, o, base, models.get(weights_key(o, base))) for n, o in specs]
    cfg = SweepConfig.from_args(
        args,
        rates=[float(x) for x in args.rates.split(",")],
        max_requests=args.max_requests,
        slo_s=args.slo,
        budget_s=args.budget_s,
        arrival_draw=args.arrival_draw,
    )
    report = new_report(
        "sweep",
        args.name,
        args.argv,
        model=path,
        device=args.device,
        dtype=args.dtype,
        mix=mix.describe(),
        systems=[{"name": n, **o} for n, o in specs],
        **{k: v for k, v in vars(cfg).items()},
    )
    out = result_path(args.out, args.name)
    try:
        run_sweep(systems, mix, cfg, report, save=lambda: write_json(report, out))
    finally:
        for s in systems:
            s.close()
    print(f"results written to {out}")


def cmd_smoke(args: argparse.Namespace) -> None:
    from synerdiff.engine.profiler import parse_sizes

    from .baselines import bench_engine_config, engine_config
    from .report import new_report, result_path, write_json
    from .smoke import smoke_engine, smoke_requests

    path, model = _load(args)
    base = bench_engine_config(path, args.device, args.dtype, args.profile_path)
    reqs = smoke_requests(
        args.requests,
        parse_sizes(args.size)[0],
        tuple(int(x) for x in args.steps_choices.split(",")),
        tuple(float(x) for x in args.guidance_choices.split(",")),
        tuple(args.samplers.split(",")),
        args.seed,
    )
    report = new_report("smoke", args.name, args.argv, model=path, requests=args.requests, size=args.size, stagger_s=args.stagger_s)
    report["systems"] = {}
    out = result_path(args.out, args.name)
    failed = []
    for name, opts in _specs(args):
        if opts.get("kind", "engine") != "engine":
            raise SystemExit(f"smoke drives engines only; {name} is kind={opts['kind']}")
        cfg = engine_config(base, {k: v for k, v in opts.items() if k != "kind"})
        try:
            report["systems"][name] = smoke_engine(name, cfg, model, reqs, args.stagger_s, args.check_exact)
        except Exception as exc:  # recorded; the next system still gets its turn on the GPU
            traceback.print_exc()
            report["systems"][name] = {"config": cfg.model_dump(mode="json"), "error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        write_json(report, out)
    print(f"results written to {out}")
    if failed or not all(s["summary"]["all_ok"] for s in report["systems"].values() if "summary" in s):
        raise SystemExit(f"smoke: not every request of every system succeeded (see {out})")


def cmd_scale(args: argparse.Namespace) -> None:
    from .scaling import run_scaling

    run_scaling(args)


def cmd_overlap(args: argparse.Namespace) -> None:
    from synerdiff.engine.executor import StepExecutor

    from .overlap import measure_overlap
    from .report import new_report, result_path, write_json

    path, model = _load(args)
    if model.device.type != "cuda":
        raise SystemExit("overlap needs a CUDA device: it times two CUDA streams on one GPU")
    executor = StepExecutor(model)
    rows = [int(x) for x in args.rows.split(",")]
    from synerdiff.contract.config import EngineConfig, SchedulerConfig

    # Uncompiled graphs at exactly the rows asked for: what the overlap of two streams costs, not the kernels.
    fast = EngineConfig(scheduler=SchedulerConfig(max_rows=max(rows)), fast_path_compile=False, fast_path_rows=sorted(set(rows)))
    executor.enable_fast_path(fast, [(model.default_size, model.default_size)])
    report = new_report("overlap", args.name, args.argv, model=path, dtype=args.dtype)
    report["points"] = measure_overlap(executor, rows, [int(x) for x in args.images.split(",")], args.repeats)
    out = result_path(args.out, args.name)
    write_json(report, out)
    print(f"results written to {out}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .plot import plot

    print(plot(args.json, args.output))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fastpath"]:  # its own argument parser: phases with their own options
        from .fastpath import main as fastpath_main

        fastpath_main(argv[1:], stamp=argv)
        return
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # stamped into the result files
    {"build-model": cmd_build_model, "profile": cmd_profile, "run": cmd_run, "smoke": cmd_smoke, "scale": cmd_scale, "overlap": cmd_overlap, "plot": cmd_plot}[
        args.cmd
    ](args)


if __name__ == "__main__":
    main(sys.argv[1:])
