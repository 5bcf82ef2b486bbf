"""Train the embedded default model on procedural shapes (docs/model.md has the full story).

Two phases, each bounded by steps and/or minutes:
1. an AutoencoderKL (64x64x3 <-> 16x16x4) on reconstruction + a small KL term, after which
   the latents' scaling_factor is set to 1/std;
2. a UNet2DConditionModel and a CLIPTextModel together, with the epsilon-prediction loss on
   SD1.5's DDPM schedule and 10% empty captions so classifier-free guidance works.
EMA weights of phase 2 are what gets written, as a diffusers StableDiffusionPipeline directory.

    python -m synerdiff_training.shapes.train --out DIR --vae-minutes 1.1 --unet-minutes 6.2 --p-position 0.85 [--tar model.tar --eval-seeds 4]
    python -m synerdiff_training.shapes.train --out DIR --vae-steps 3 --unet-steps 3 --vae-batch 8 --batch 8   # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from ..make_tiny import SD15_SCHEDULER, TINY_VAE, write_char_tokenizer, write_model_index
from .dataset import HELD_OUT_TRIPLES, TRAIN_TRIPLES, VOCAB, render, sample_scenes

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
# Down to 4x4, where every cell touches the zero padding, so absolute position (which
# left/right needs) is cheap to compute; attention only at 8x8 and 4x4 keeps it fast.
# The shipped model's layout (its third training run): the small one never learned left from right (docs/model.md).
UNET_DEEP = dict(
    UNET,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
UNETS = {"small": UNET, "deep": UNET_DEEP}
VAE = dict(TINY_VAE)
TEXT = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
)


def write_tokenizer(out: Path) -> int:
    """write_char_tokenizer with the grammar's words, plus merges that make each word one token.

    Its left-to-right merges can collide across words ("la" from "large" outranks "bl", so
    "black" stops at b|la|c|k). Merges appended at the end never change a word that already
    merges fully (BPE always prefers the lower rank), so patching the stragglers is safe.
    Returns the vocabulary size.
    """
    from transformers import CLIPTokenizer

    write_char_tokenizer(out, list(VOCAB))
    tok_dir = out / "tokenizer"
    for _ in range(len(VOCAB)):
        tok = CLIPTokenizer.from_pretrained(tok_dir)
        split = {w: tok.tokenize(w) for w in VOCAB}
        todo = {w: p for w, p in split.items() if len(p) > 1}
        if not todo:
            return len(tok.get_vocab())
        vocab = json.loads((tok_dir / "vocab.json").read_text())
        special = {k: vocab.pop(k) for k in ("<|startoftext|>", "<|endoftext|>")}
        merges = (tok_dir / "merges.txt").read_text().splitlines()
        have = set(merges)
        for pieces in todo.values():
            cur = pieces[0]
            for nxt in pieces[1:]:
                if f"{cur} {nxt}" not in have:
                    merges.append(f"{cur} {nxt}")
                    have.add(merges[-1])
                vocab.setdefault(cur + nxt, len(vocab))
                cur += nxt
        for k in special:  # keep the special tokens last, as write_char_tokenizer does
            vocab[k] = len(vocab)
        (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tok_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    raise RuntimeError(f"could not make single tokens of {sorted(todo)}")


def build_models(vocab_size: int, arch: str = "small"):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**UNETS[arch])
    vae = AutoencoderKL(**VAE)
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TEXT)
    return unet, vae, CLIPTextModel(text_cfg)


class Budget:
    """Stops a phase at whichever comes first of `steps` and `minutes`; progress() in [0, 1]
    drives the learning-rate schedule, so a time-bounded run still anneals to the end."""

    def __init__(self, steps: int | None, minutes: float | None):
        if not steps and not minutes:
            raise ValueError("need steps or minutes")
        self.steps, self.seconds = steps, (minutes * 60 if minutes else None)
        self.t0 = time.perf_counter()
        self.step = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self) -> float:
        p = 0.0
        if self.steps:
            p = max(p, self.step / self.steps)
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return min(p, 1.0)

    def done(self) -> bool:
        return self.progress() >= 1.0


def lr_at(base: float, step: int, progress: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def images(rng, n: int, device, triples=TRAIN_TRIPLES, p_position: float = 0.6):
    batch = sample_scenes(n, rng, triples=triples, p_position=p_position)
    return render(batch, device).mul_(2).sub_(1), batch


def train_vae(vae, args, device, rng, log) -> dict:
    import torch
    import torch.nn.functional as F

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, **_fused(device))
    budget = Budget(args.vae_steps, args.vae_minutes)
    ema_loss: tuple[float, ...] | None = None
    last_print = 0.0
    while not budget.done():
        x, _ = images(rng, args.vae_batch, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(args.vae_lr, budget.step, budget.progress(), 100)
        with _autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec.float(), x)
        kl = post.kl().mean() / (post.mean.shape[1] * post.mean.shape[2] * post.mean.shape[3])
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        budget.step += 1
        if budget.step % 25 == 1 or budget.done():
            cur = (rec_loss.item(), kl.item())
            ema_loss = cur if ema_loss is None else tuple(0.8 * a + 0.2 * b for a, b in zip(ema_loss, cur, strict=False))
            if budget.elapsed() - last_print > args.print_every or budget.done():
                last_print = budget.elapsed()
                log(f"vae step {budget.step} t={budget.elapsed():.0f}s rec_mse={ema_loss[0]:.5f} kl={ema_loss[1]:.3f}")
    assert ema_loss is not None, "the VAE budget ran out before its first step"
    vae.eval()
    # Captions state every attribute so the reconstructions can be scored in full: the
    # decoder bounds what any UNet can do, so the scorer must still read what it draws.
    from .scorer import score

    val_batch = sample_scenes(512 if device != "cpu" else 64, np.random.default_rng(args.seed + 1000), p_size=1, p_position=1, p_background=1)
    with torch.no_grad():
        x = render(val_batch, device) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(post.mean).sample.float().clamp(-1, 1)
        std = z.float().std().item()
        val = F.mse_loss(rec, x).item()
    vae.register_to_config(scaling_factor=1.0 / std)
    rec_u8 = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    recon_acc = float(np.mean([score(im, c).correct for im, c in zip(rec_u8, val_batch.captions, strict=False)]))
    stats = dict(
        steps=budget.step,
        seconds=round(budget.elapsed(), 1),
        rec_mse=ema_loss[0],
        kl=ema_loss[1],
        val_rec_mse=val,
        latent_std=std,
        latent_mean=z.float().mean().item(),
        scaling_factor=1.0 / std,
        recon_adherence=recon_acc,
    )
    log(f"vae done: {stats}")
    return stats


def train_unet(unet, text_encoder, vae, tokenizer, args, device, rng, log) -> tuple[dict, object, object]:
    import torch
    import torch.nn.functional as F

    sf = vae.config.scaling_factor
    betas = torch.linspace(SD15_SCHEDULER["beta_start"] ** 0.5, SD15_SCHEDULER["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sqrt_ac = alphas_cumprod.sqrt().float().to(device)
    sqrt_1m = (1 - alphas_cumprod).sqrt().float().to(device)

    # The grammar has a few thousand captions; tokenising each once keeps the CPU off the step's path.
    ids_cache: dict[str, np.ndarray] = {}

    def ids_of(captions: list[str]) -> torch.Tensor:
        miss = [c for c in set(captions) if c not in ids_cache]
        if miss:
            enc = tokenizer(miss, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            ids_cache.update(zip(miss, np.asarray(enc.input_ids, dtype=np.int64), strict=False))
        return torch.from_numpy(np.stack([ids_cache[c] for c in captions])).to(device, non_blocking=True)

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, **_fused(device))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    budget = Budget(args.unet_steps, args.unet_minutes)
    ema_loss, last_print, losses = None, 0.0, []
    while not budget.done():
        x, batch = images(rng, args.batch, device, p_position=args.p_position)
        caps = ["" if d else c for c, d in zip(batch.captions, rng.random(len(batch)) < args.drop, strict=False)]
        ids = ids_of(caps)
        with torch.no_grad(), _autocast(device):
            z = vae.encode(x).latent_dist.sample().float() * sf
        noise = torch.randn_like(z)
        t = torch.randint(args.t_min, 1000, (z.shape[0],), device=device)
        zt = sqrt_ac[t].view(-1, 1, 1, 1) * z + sqrt_1m[t].view(-1, 1, 1, 1) * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, budget.step, budget.progress(), args.warmup)
        with _autocast(device):
            cond = text_encoder(ids)[0]
            pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.step += 1
        # Short warm-up of the EMA decay so early weights don't linger in the average.
        decay = min(args.ema, (1 + budget.step) / (10 + budget.step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if budget.step % 25 == 1 or budget.done():
            cur = loss.item()
            ema_loss = cur if ema_loss is None else 0.9 * ema_loss + 0.1 * cur
            if budget.elapsed() - last_print > args.print_every or budget.done():
                last_print = budget.elapsed()
                losses.append((budget.step, round(budget.elapsed(), 1), round(ema_loss, 5)))
                log(
                    f"unet step {budget.step} t={budget.elapsed():.0f}s loss={ema_loss:.4f} "
                    f"lr={opt.param_groups[0]['lr']:.2e} {budget.step / budget.elapsed():.1f} it/s"
                )
    stats = dict(steps=budget.step, seconds=round(budget.elapsed(), 1), loss=ema_loss, loss_curve=losses)
    log(f"unet done: steps={budget.step} seconds={stats['seconds']} loss={ema_loss:.4f}")
    return stats, ema_unet, ema_text


def save(out: Path, unet, vae, text_encoder) -> None:
    import torch
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    # fp16 halves the UNet on disk; diffusers loads it back as float32 unless told otherwise.
    copy.deepcopy(unet).to("cpu", torch.float16).save_pretrained(out / "unet")
    copy.deepcopy(vae).to("cpu", torch.float32).save_pretrained(out / "vae")
    copy.deepcopy(text_encoder).to("cpu", torch.float32).save_pretrained(out / "text_encoder")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(out / "scheduler")
    write_model_index(out)
    for f in out.rglob("*"):  # safetensors writes 0600; the repo ships 0644
        f.chmod(0o755 if f.is_dir() else 0o644)


def _fused(device) -> dict:
    return {"fused": True} if str(device).startswith("cuda") else {}


def _autocast(device):
    import contextlib

    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output diffusers directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=sorted(UNETS), default="deep", help="UNet layout (see UNETS); deep is the shipped one")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--vae-minutes", type=float, default=None)
    ap.add_argument("--vae-batch", type=int, default=256)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-element KL term")
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--unet-minutes", type=float, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--drop", type=float, default=0.1, help="share of empty captions, for classifier-free guidance")
    ap.add_argument("--p-position", type=float, default=0.6, help="share of captions that state the position")
    ap.add_argument("--t-min", type=int, default=0, help="lowest training timestep (fine-tuning the layout only needs high ones)")
    ap.add_argument("--init", default=None, help="start from this model directory (fine-tuning; --vae-steps 0 keeps its VAE)")
    ap.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--tar", default=None, help="also pack the output directory into this tar file")
    ap.add_argument("--eval-seeds", type=int, default=0, help="after saving, score held-out prompts with this many seeds each")
    ap.add_argument("--eval-json", default=None, help="where to write the evaluation report")
    ap.add_argument("--eval-grid", default=None, help="PNG grid of the held-out images")
    args = ap.parse_args(argv)
    if not (args.vae_steps or args.vae_minutes or (args.init and args.vae_steps == 0)) or not (args.unet_steps or args.unet_minutes):
        ap.error("give --vae-steps/--vae-minutes and --unet-steps/--unet-minutes")

    import torch
    from transformers import CLIPTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def log(msg: str) -> None:
        print(f"[train] {msg}", flush=True)

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    unet, vae, text_encoder = build_models(vocab_size, args.arch)
    if args.init:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(Path(args.init) / "unet")
        vae = AutoencoderKL.from_pretrained(Path(args.init) / "vae")
        text_encoder = CLIPTextModel.from_pretrained(Path(args.init) / "text_encoder", dtype=torch.float32)
    unet.to(device)
    vae.to(device)
    text_encoder.to(device)
    log(
        f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}) "
        f"params: unet={_count(unet):.2f}M vae={_count(vae):.2f}M text={_count(text_encoder):.2f}M "
        f"train triples={len(TRAIN_TRIPLES)} held out={len(HELD_OUT_TRIPLES)}"
    )
    if args.init and args.vae_steps == 0:
        vae_stats = dict(init=str(args.init), scaling_factor=vae.config.scaling_factor)
        vae.eval()
    else:
        vae_stats = train_vae(vae, args, device, rng, log)
    vae.requires_grad_(False)
    unet_stats, ema_unet, ema_text = train_unet(unet, text_encoder, vae, tokenizer, args, device, rng, log)
    save(out, ema_unet, vae, ema_text)
    report = dict(
        command=" ".join(["python -m synerdiff_training.shapes.train"] + (argv if argv is not None else __import__("sys").argv[1:])),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        torch=torch.__version__,
        seed=args.seed,
        vae=vae_stats,
        unet=unet_stats,
        total_seconds=round(time.perf_counter() - t0, 1),
    )
    (out / "training.json").write_text(json.dumps(report, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 2**20:.1f} MiB) in {report['total_seconds']}s")
    if args.tar:
        import tarfile

        with tarfile.open(args.tar, "w") as tf:
            tf.add(out, arcname=out.name)
        log(f"packed {args.tar}")
    if args.eval_seeds:
        from .evaluate import evaluate_model

        report["eval"] = evaluate_model(out, seeds=args.eval_seeds, device=device, log=log, grid=args.eval_grid)
        if args.eval_json:
            Path(args.eval_json).write_text(json.dumps(report, indent=1))
    return report


def _count(m) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


if __name__ == "__main__":
    main()
