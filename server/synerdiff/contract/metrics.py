"""Names and histogram buckets of an engine's Prometheus metrics (its `/metrics`).

The server registers them; the operator's autoscaler and the pool simulator read them.
Counters are named without `_total`: prometheus_client appends it on exposition.
"""

from __future__ import annotations

# Gauges computed at scrape time.
WAITING = "synerdiff_requests_waiting"
RUNNING = "synerdiff_requests_running"
ROWS_ACTIVE = "synerdiff_unet_rows_active"
READY = "synerdiff_ready"
THRESHOLD = "synerdiff_scheduler_threshold"
SKIP_CFG_BOUND = "synerdiff_skip_cfg_bound"
SKIP_CFG_FRACTION = "synerdiff_skip_cfg_fraction"
MAX_ROWS = "synerdiff_scheduler_max_rows"
GRAPHS_READY = "synerdiff_fast_path_graphs_ready"
GRAPHS = "synerdiff_fast_path_graphs"
STARTUP_SECONDS = "synerdiff_startup_seconds"
STARTUP_STAGE_SECONDS = "synerdiff_startup_stage_seconds"  # label stage: loading model, compiling (or capturing graphs), profiling, warming up
COMPILE_CACHE = "synerdiff_compile_cache"  # 1 for the label state = warm | partial | cold | off the start used
MODEL_INFO = "synerdiff_model_info"  # 1, labels family, repo and commit (repo and commit of a `synerdiff fetch` download, else empty)
# UNet rows x steps queued and still to run, a row counted at its pixels over the native pixels (what a router balances)
OUTSTANDING = "synerdiff_outstanding_row_steps"
NATIVE_SIZE = "synerdiff_native_size_pixels"  # the model's native side in pixels (0 until loaded): the router weighs sizes by it

# Histograms.
STEP_ROWS = "synerdiff_step_rows"
UNET_STEP = "synerdiff_unet_step_seconds"
VAE_DECODE = "synerdiff_vae_decode_seconds"
QUEUE_WAIT = "synerdiff_queue_wait_seconds"
LATENCY = "synerdiff_request_latency_seconds"
STEP_INFLATION = "synerdiff_step_inflation_ratio"

# Counters (exposed with a `_total` suffix).
IMAGES = "synerdiff_images_generated"
REQUESTS = "synerdiff_requests"
CFG_SKIPPED = "synerdiff_cfg_skipped_steps"
VAE_CHUNKS = "synerdiff_vae_chunks"
VAE_BESIDE = "synerdiff_vae_beside_images"
VAE_FALLBACKS = "synerdiff_vae_oom_fallbacks"
PADDED_ROWS = "synerdiff_unet_padded_rows"
LORA_LOADED = "synerdiff_lora_adapters_loaded"
LORA_LOADS = "synerdiff_lora_loads"
LORA_EVICTIONS = "synerdiff_lora_evictions"
LORA_LOAD_SECONDS = "synerdiff_lora_load_seconds"


def total(counter: str) -> str:
    """The exposed series name of a counter."""
    return counter + "_total"


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
INFLATION_BUCKETS = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


# The router (`synerdiff route`): its own /metrics. The operator reads BUFFERED to wake a pool at zero.
ROUTER_REQUESTS = "synerdiff_router_requests"  # counter {upstream, outcome}
ROUTER_RETRIES = "synerdiff_router_retries"  # counter {reason}
ROUTER_BUFFERED = "synerdiff_router_requests_buffered"  # gauge: requests waiting for a ready engine
ROUTER_BUFFER_WAIT = "synerdiff_router_buffer_wait_seconds"  # histogram
ROUTER_OUTSTANDING = "synerdiff_router_upstream_outstanding_row_steps"  # gauge {upstream}: the load the router counts
ROUTER_UPSTREAM_READY = "synerdiff_router_upstream_ready"  # gauge {upstream}
ROUTER_UPSTREAMS = "synerdiff_router_upstreams"  # gauge: engines known (ready or not)

# Response header an engine sets on a 429/503 refusal made before the request reached the engine's
# queue: the request never started, so a router may send it elsewhere.
NOT_STARTED_HEADER = "X-SynerDiff-Not-Started"
