"""Prometheus metrics of one server: engine iterations, request outcomes, live queue gauges.

Each app owns its CollectorRegistry, so several apps (tests) never collide on the global
one. Gauges an autoscaler or a router reads (waiting, running, rows) are computed at
scrape time from the engine, not sampled from the last iteration, so an idle engine with a
full queue is never reported as empty.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..contract import metrics as names
from ..contract.metrics import INFLATION_BUCKETS, LATENCY_BUCKETS, ROW_BUCKETS, STEP_BUCKETS
from ..engine import Engine, EngineObserver, IterationStats
from ..models.fetch import recorded

# Series that exist from the first scrape so that rate() and alerts see zeros, not gaps.
_INITIAL_OUTCOMES = (
    ("ok", "none"),
    ("cancelled", "cancelled"),
    ("timeout", "timeout"),
    ("rejected", "invalid_request"),
    ("rejected", "queue_full"),
    ("rejected", "shutting_down"),
    ("failed", "engine_fault"),
    ("failed", "out_of_memory"),
)


def current_threshold(engine: Engine) -> float:
    """The threshold in force: the adaptive controller's current value, else the configured one."""
    live = getattr(getattr(engine, "controller", None), "threshold", None)
    if isinstance(live, (int, float)):
        return float(live)
    return float(engine.config.scheduler.threshold)


def current_skip_fraction(engine: Engine) -> float:
    """The skip-CFG fraction in force at the current threshold (at most skip_cfg_bound)."""
    cfg = engine.config.scheduler
    try:
        from ..scheduling.controller import skip_fraction
    except ImportError:  # an engine without the controller: the configured bound applies
        return float(cfg.skip_cfg_bound)
    return float(skip_fraction(cfg, current_threshold(engine)))


class ServerMetrics:
    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None, ready=lambda: False):
        self.engine = engine
        self.registry = registry or CollectorRegistry()
        r = self.registry

        Gauge(names.WAITING, "Requests queued, not yet admitted to the running batch.", registry=r).set_function(lambda: engine.waiting)
        Gauge(names.RUNNING, "Requests admitted and not finished (denoising or decoding).", registry=r).set_function(lambda: engine.running)
        Gauge(names.ROWS_ACTIVE, "UNet rows held by running requests (a guided image is 2 rows).", registry=r).set_function(lambda: engine.rows_active)
        Gauge(names.READY, "1 when the model is loaded, warmed up and the server is not draining.", registry=r).set_function(lambda: 1.0 if ready() else 0.0)
        Gauge(names.THRESHOLD, "Scheduler throughput threshold in force (moved by the adaptive controller).", registry=r).set_function(
            lambda: current_threshold(engine)
        )
        Gauge(names.SKIP_CFG_BOUND, "Configured largest fraction of a guided request's steps that may skip CFG.", registry=r).set_function(
            lambda: engine.config.scheduler.skip_cfg_bound
        )
        Gauge(names.SKIP_CFG_FRACTION, "Fraction of late steps that may skip CFG now (grows with the threshold).", registry=r).set_function(
            lambda: current_skip_fraction(engine)
        )
        Gauge(names.MAX_ROWS, "Most UNet rows in one forward.", registry=r).set_function(lambda: engine.config.scheduler.max_rows)
        Gauge(names.GRAPHS_READY, "UNet graphs compiled (or captured) so far at start-up.", registry=r).set_function(
            lambda: engine.startup.fast_path.kernels_ready if engine.startup.fast_path else 0
        )
        Gauge(names.GRAPHS, "UNet graphs the start-up compiles (or captures): one per image size and row size.", registry=r).set_function(
            lambda: engine.startup.fast_path.kernels_total if engine.startup.fast_path else 0
        )
        Gauge(names.STARTUP_SECONDS, "Seconds from the start of loading to ready (0 until ready).", registry=r).set_function(lambda: engine.startup.seconds)
        self.startup_stages = Gauge(
            names.STARTUP_STAGE_SECONDS,
            "Seconds each start-up stage took (loading model, compiling or capturing graphs, profiling, warming up); absent until ready.",
            ["stage"],
            registry=r,
        )
        self._cache_state_shown = False
        self.model_info = Gauge(
            names.MODEL_INFO,
            "1; the served model's family, and the source and commit it was fetched from (empty when not fetched; for s3:// and gs:// a digest of the objects' versions).",
            ["family", "repo", "commit"],
            registry=r,
        )
        self.compile_cache = Gauge(
            names.COMPILE_CACHE, "1 for how this start got its compiled kernels: warm (from the compile cache), partial, cold or off.", ["state"], registry=r
        )
        Gauge(
            names.OUTSTANDING,
            "UNet row-steps queued and still to run (rows x remaining steps, a row counted at its pixels over the native pixels; a router balances on it).",
            registry=r,
        ).set_function(lambda: engine.outstanding_work)
        Gauge(names.NATIVE_SIZE, "The model's native image side in pixels (0 until the model is loaded).", registry=r).set_function(
            lambda: engine.native_size or 0
        )

        self.step_rows = Histogram(names.STEP_ROWS, "UNet rows per denoising step.", buckets=ROW_BUCKETS, registry=r)
        self.unet_step = Histogram(names.UNET_STEP, "One batched denoising step: UNet forward plus sampler update.", buckets=STEP_BUCKETS, registry=r)
        self.vae_decode = Histogram(names.VAE_DECODE, "One VAE decode call (one or more chunks of images).", buckets=STEP_BUCKETS, registry=r)
        self.queue_wait = Histogram(names.QUEUE_WAIT, "Arrival to admission, per admitted request.", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(
            names.LATENCY,
            "End-to-end latency of successful generation requests, HTTP arrival to response ready.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(names.IMAGES, "Images returned to clients.", registry=r)
        self.requests = Counter(names.REQUESTS, "Generation requests by outcome.", ["status", "reason"], registry=r)
        self.cfg_skipped = Counter(names.CFG_SKIPPED, "Request-steps of guided requests that ran without CFG.", registry=r)
        self.step_inflation = Histogram(
            names.STEP_INFLATION,
            "Iteration time over the profiled bare UNet step time for the same rows (VAE and admission contention).",
            buckets=INFLATION_BUCKETS,
            registry=r,
        )
        self.vae_chunks = Counter(names.VAE_CHUNKS, "VAE decode chunks (one per request per decode call).", registry=r)
        self.vae_beside = Counter(names.VAE_BESIDE, "Images decoded one per chunk on a second CUDA stream during a UNet step.", registry=r)
        self.padded_rows = Counter(
            names.PADDED_ROWS, "Rows the replayed UNet graphs ran beyond the requests' rows (padding up to a compiled row size).", registry=r
        )
        self.vae_fallbacks = Counter(names.VAE_FALLBACKS, "Decodes that ran out of GPU memory and were redone one image at a time (then in tiles).", registry=r)
        Gauge(names.LORA_LOADED, "LoRA adapters held in the device slots.", registry=r).set_function(lambda: len(engine.adapters_loaded()))
        self.lora_loads = Counter(names.LORA_LOADS, "LoRA adapters loaded into a device slot.", registry=r)
        self.lora_evictions = Counter(names.LORA_EVICTIONS, "LoRA adapters evicted from a device slot (least recently used, unpinned).", registry=r)
        self.lora_load = Histogram(names.LORA_LOAD_SECONDS, "Copying one LoRA adapter into its device slot.", buckets=STEP_BUCKETS, registry=r)
        self._lora_seen = (0, 0)
        for status, reason in _INITIAL_OUTCOMES:
            self.requests.labels(status, reason)
        self._observer = EngineObserver(on_iteration=self.on_iteration)

    # Engine thread: keep it cheap, no locks beyond prometheus_client's own.
    def on_iteration(self, stats: IterationStats) -> None:
        if stats.rows:
            self.step_rows.observe(stats.rows)
            self.unet_step.observe(stats.unet_s + stats.sampler_s)
        if stats.padded_rows:
            self.padded_rows.inc(stats.padded_rows)
        if stats.step_inflation:
            self.step_inflation.observe(stats.step_inflation)
        if stats.vae_chunks:
            self.vae_decode.observe(stats.vae_s)
            self.vae_chunks.inc(stats.vae_chunks)
        if stats.vae_beside:
            self.vae_beside.inc(stats.vae_beside)
        if stats.vae_fallbacks:
            self.vae_fallbacks.inc(stats.vae_fallbacks)
        if stats.cfg_skipped:
            self.cfg_skipped.inc(stats.cfg_skipped)
        for wait in stats.queue_waits_s:
            self.queue_wait.observe(wait)
        lora = self.engine.lora
        if lora is not None:
            loads, evictions = lora.stats.loads, lora.stats.evictions
            self.lora_loads.inc(loads - self._lora_seen[0])
            self.lora_evictions.inc(evictions - self._lora_seen[1])
            self._lora_seen = (loads, evictions)
            while lora.stats.load_seconds:
                self.lora_load.observe(lora.stats.load_seconds.popleft())

    def attach(self) -> None:
        if self._observer not in self.engine.observers:
            self.engine.observers.append(self._observer)

    def detach(self) -> None:
        if self._observer in self.engine.observers:
            self.engine.observers.remove(self._observer)

    def request_done(self, status: str, reason: str, latency_s: float | None = None, images: int = 0) -> None:
        self.requests.labels(status, reason).inc()
        if status == "ok":
            if latency_s is not None:
                self.latency.observe(latency_s)
            self.images.inc(images)

    def render(self) -> bytes:
        if self.engine.ready and not self._cache_state_shown:  # a start never changes these
            fp = self.engine.startup.fast_path
            self.compile_cache.labels(fp.cache if fp is not None else "off").set(1)
            source = recorded(self.engine.model.path)
            self.model_info.labels(self.engine.model.family, source.repo if source else "", source.commit if source else "").set(1)
            for stage, seconds in self.engine.startup.stages.items():
                self.startup_stages.labels(stage).set(seconds)
            self._cache_state_shown = True
        return generate_latest(self.registry)


def outcome(http_status: int, code: str | None) -> tuple[str, str]:
    """(status, reason) labels for a finished generation request."""
    if http_status < 400:
        return "ok", "none"
    if http_status == 499:
        return "cancelled", "cancelled"
    if http_status == 504:
        return "timeout", "timeout"
    if http_status >= 500 and code not in ("shutting_down", "loading"):
        return "failed", code or "internal_error"
    if http_status in (400, 404, 422):
        return "rejected", "invalid_request"
    return "rejected", code or str(http_status)
