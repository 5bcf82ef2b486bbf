"""What the load generator sends: request mixes and seeded open-loop Poisson arrival times.

Every system at one offered rate gets the identical arrival sequence and identical
requests (prompts, sizes, steps, seeds), so their numbers differ only by how they serve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from synerdiff.engine.request import GenerationRequest

Size = tuple[int, int]  # (height, width)

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a red sports car parked in the rain, cinematic",
    "a bowl of ramen, studio lighting, 85mm",
    "an isometric pixel-art castle on a floating island",
    "portrait of an old fisherman, dramatic light",
    "a cat wearing a tiny wizard hat",
    "a mountain lake with pine trees, autumn",
)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    sampler: str = "euler"
    n: int = 1

    @property
    def size(self) -> Size:
        return (self.height, self.width)

    def to_engine(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            n=self.n,
            height=self.height,
            width=self.width,
            steps=self.steps,
            guidance_scale=self.guidance,
            seed=self.seed,
            sampler=self.sampler,
        )


def size_key(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Mix:
    name: str
    sizes: tuple[Size, ...]
    steps: tuple[int, int]  # inclusive range
    guidance: float = 7.5
    sampler: str = "euler"

    def make(self, index: int, rng: random.Random, seed_base: int) -> BenchRequest:
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        height, width = self.sizes[rng.randrange(len(self.sizes))]
        steps = rng.randint(*self.steps)
        return BenchRequest(index, prompt, height, width, steps, self.guidance, seed_base + index, self.sampler)

    def lone_requests(self) -> list[BenchRequest]:
        """One request per size at the most steps: what the lone-request latency is measured on."""
        return [
            BenchRequest(index=-1 - i, prompt=PROMPTS[0], height=h, width=w, steps=self.steps[1], guidance=self.guidance, seed=i, sampler=self.sampler)
            for i, (h, w) in enumerate(self.sizes)
        ]

    def describe(self) -> dict:
        return {"name": self.name, "sizes": [size_key(s) for s in self.sizes], "steps": list(self.steps), "guidance": self.guidance, "sampler": self.sampler}


def default_mix(size: Size = (512, 512), steps: int = 50, guidance: float = 7.5) -> Mix:
    return Mix("default", (size,), (steps, steps), guidance)


def mixed_mix(sizes: tuple[Size, ...] = ((512, 512), (384, 640)), steps: tuple[int, int] = (20, 50), guidance: float = 7.5) -> Mix:
    return Mix("mixed", sizes, steps, guidance)


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds after the run starts
    request: BenchRequest
    warmup: bool  # sent for load, left out of the statistics


ARRIVAL_DRAWS = ("shared", "per-rate")


def poisson_arrivals(
    rate: float,
    duration_s: float,
    warmup_s: float,
    mix: Mix,
    seed: int = 0,
    max_requests: int | None = None,
    draw: str = "shared",
) -> list[Arrival]:
    """Exponential inter-arrival gaps at `rate`/s: warm-up arrivals first, then measured ones
    until `duration_s` has passed or `max_requests` measured ones were made.

    draw="shared" (common random numbers): every rate replays one unit-rate draw of `seed`,
    compressed by `rate`, with the same request sequence. Rate points then differ only in
    load, so latency rises with rate instead of jumping with each point's own luck (one
    30 s draw can hold 30 % more arrivals than its nominal rate). "per-rate" draws each rate
    independently: what the committed *-run1 to *-run4 results used.
    """
    if draw not in ARRIVAL_DRAWS:
        raise ValueError(f"arrival draw must be one of {ARRIVAL_DRAWS}, not {draw!r}")
    key = f"{seed}" if draw == "shared" else f"{seed}:{rate}"
    rng = random.Random(f"arrivals:{key}")
    req_rng = random.Random(f"requests:{key}")
    out: list[Arrival] = []
    t, measured = 0.0, 0
    while True:
        t += rng.expovariate(1.0) / rate
        if t > warmup_s + duration_s:
            break
        warm = t < warmup_s
        if not warm:
            if max_requests is not None and measured >= max_requests:
                break
            measured += 1
        out.append(Arrival(t, mix.make(len(out), req_rng, seed_base=seed * 1_000_000), warm))
    return out


def window_end(arrivals: list[Arrival], warmup_s: float, duration_s: float, max_requests: int | None) -> float:
    """End of the measurement window: the duration, or the last arrival when max_requests cut it short."""
    measured = sum(not a.warmup for a in arrivals)
    if max_requests is not None and measured >= max_requests and arrivals:
        return arrivals[-1].t
    return warmup_s + duration_s
