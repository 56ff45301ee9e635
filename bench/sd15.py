"""Re-steering (and textual inversion) cost at real Stable Diffusion sizes, random weights.

Builds UNet2DConditionModel with SD1.5's config (860M parameters; 64x64 latents = 512 px,
text states 77x768) or SDXL's (2.6B; 128x128 latents = 1024 px, 77x2048 + pooled/time
ids) with random weights, so nothing is downloaded, and times re-steering steps:

- ours: latents and text states cached (computed once, outside the loop), only attn2
  to_k/to_v require grad, capture on attn2 only (fmn.model.attention), SDPA self-attention, the
  preservation term in its Gram form (fmn.train.resteer.AnchorGram), AdamW + clipping: the
  inner loop of fmn.train.resteer.resteer;
- original: every step VAE-encodes the batch's pixels and runs the text encoder(s); the
  whole UNet trains in fp32 (AdamW over every parameter) with the classic
  explicit-probability processor on every attention module (bench/resteer.py);
- ti: textual inversion steps (4 learned token vectors; text encoder forward/backward and
  UNet forward/backward to its text input), as fmn.train.invert does.

On CPU (default: one step each, 1 thread) it reports seconds per step and peak RSS; on a
GPU (`--device cuda --bf16`) seconds per concept (--steps, after one warm-up step), peak
GPU memory and achieved TFLOP/s (FLOPs counted with torch.utils.flop_counter on one step).
`--size tiny` is a seconds-long dry run of every code path.

Usage: python bench/sd15.py [--size sd15|sdxl|tiny] [--device cpu|cuda] [--steps 1]
       [--impls ours original ti] [--bf16] [--out bench/results/sd15.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PeakRSS,
    git_commit,
    machine,
    markdown_table,
    maxrss_mb,
    write_results,
)

# OpenAI CLIP ViT-L/14's text tower: SD1.5's encoder and SDXL's first one
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)

SIZES = {
    "sd15": {
        "unet": dict(
            sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "text": [CLIP_L],
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        "latent": 64,
    },
    "sdxl": {
        "unet": dict(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "text": [
            CLIP_L,
            dict(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
            ),
        ],
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        "latent": 128,
        "pooled": 1280,
    },
    "tiny": {
        "unet": dict(
            sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        "text": [
            dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        ],
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1),
        "latent": 8,
    },
    "tinyxl": {  # the SDXL code paths (two text encoders, pooled + time ids) in seconds
        "unet": dict(
            sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        ),
        "text": [
            dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
            dict(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=32,
            ),
        ],
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1),
        "latent": 8,
        "pooled": 32,
    },
}
SEQ, VOCAB, CONCEPT_POS, N_LATENTS, N_PROMPTS, N_ANCHORS = 77, 49408, 5, 16, 4, 64


class Model:
    """The UNet (and, lazily, VAE and text encoders) of one size, random weights."""

    def __init__(self, size: str, device: torch.device) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(0)
        self.size, self.spec, self.device = size, SIZES[size], device
        with torch.device(device):  # initialise on the device: seconds, not minutes, for SDXL
            self.unet = UNet2DConditionModel(**self.spec["unet"]).to(device).eval()
        self.unet.requires_grad_(False)
        self.sdxl = self.spec["unet"].get("addition_embed_type") == "text_time"
        self.sched = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        )
        self._vae = self._text = None

    @property
    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKL

            n = len(self.spec["vae"]["block_out_channels"])
            with torch.device(self.device):
                self._vae = AutoencoderKL(
                    down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n,
                    latent_channels=4,
                    **self.spec["vae"],
                ).to(self.device)
            self._vae.requires_grad_(False)
        return self._vae

    @property
    def text(self):
        if self._text is None:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            encs = []
            for k, cfg in enumerate(self.spec["text"]):
                conf = CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, **cfg)
                cls = CLIPTextModelWithProjection if k == 1 else CLIPTextModel
                with torch.device(self.device):
                    encs.append(cls(conf).to(self.device).requires_grad_(False))
            self._text = encs
        return self._text

    def encode_text(self, ids: torch.Tensor):
        """ids [B, 77] -> (states [B, 77, D], added_cond_kwargs or {})."""
        if not self.sdxl:
            return self.text[0](ids)[0], {}
        o1 = self.text[0](ids, output_hidden_states=True)
        o2 = self.text[1](ids, output_hidden_states=True)
        states = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
        return states, self.added(o2.text_embeds)

    def added(self, pooled: torch.Tensor) -> dict:
        hw = self.spec["latent"] * 8
        ids = torch.tensor([[hw, hw, 0, 0, hw, hw]], device=self.device).repeat(len(pooled), 1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.float()}}


def cached_inputs(m: Model, gen: torch.Generator):
    """What prepare would have cached: latents, text states (+ pooled), anchor states."""
    lat, d = m.spec["latent"], m.spec["unet"]["cross_attention_dim"]
    dev = m.device
    latents = torch.randn(N_LATENTS, 4, lat, lat, generator=gen, device=dev)
    states = torch.randn(N_PROMPTS, SEQ, d, generator=gen, device=dev)
    pooled = torch.randn(N_PROMPTS, m.spec.get("pooled", 0), generator=gen, device=dev)
    anchors = torch.randn(N_ANCHORS * SEQ, d, generator=gen, device=dev)
    return latents, states, pooled, anchors


def ours_steps(m: Model, steps: int, batch: int, flops: bool = False):
    """The inner loop of fmn.train.resteer.resteer on cached inputs; returns a closure per step."""
    from fmn.model.attention import AttentionStore, attention_loss, capture_cross_attention
    from fmn.train.resteer import AnchorGram, preservation_loss, select_params

    dev = m.device
    gen = torch.Generator(dev).manual_seed(0)
    latents, states, pooled, anchors = cached_inputs(m, gen)
    params = select_params(m.unet, "to_kv")
    base = {n: p.detach().clone() for n, p in params.items()}
    gram = AnchorGram(anchors)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.0)
    weights = torch.zeros(N_PROMPTS, SEQ)
    weights[:, CONCEPT_POS] = 1
    store = AttentionStore()
    store.latent_hw = tuple(latents.shape[-2:])
    ctx = capture_cross_attention(m.unet, store)
    ctx.__enter__()

    def step():
        i = torch.randint(0, N_LATENTS, (batch,), device=dev, generator=gen)
        j = torch.randint(0, N_PROMPTS, (batch,), device=dev, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
        noise = torch.randn(latents[i].shape, device=dev, generator=gen)
        store.reset()
        store.token_weights = weights[j.cpu()]
        kw = m.added(pooled[j]) if m.sdxl else {}
        with autocast(m):
            m.unet(
                m.sched.add_noise(latents[i], noise, t), t, encoder_hidden_states=states[j], **kw
            )
            loss = attention_loss(store) + 0.3 * preservation_loss(params, base, gram)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        return loss

    def close():
        ctx.__exit__(None, None, None)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
                p.requires_grad_(False)

    return step, close


def original_steps(m: Model, steps: int, batch: int):
    from bench.resteer import _Controller, _OriginalProcessor

    dev = m.device
    gen = torch.Generator(dev).manual_seed(0)
    px = m.spec["latent"] * 8
    pixels = torch.rand(N_LATENTS, 3, px, px, generator=gen, device=dev) * 2 - 1
    ids = torch.randint(0, VOCAB - 2, (N_PROMPTS, SEQ), generator=gen, device=dev)
    positions = torch.zeros(N_PROMPTS, SEQ, dtype=torch.bool, device=dev)
    positions[:, CONCEPT_POS:] = True  # the concept token and every end-of-text/padding
    controller = _Controller()
    originals = dict(m.unet.attn_processors)
    m.unet.set_attn_processor(_OriginalProcessor(controller))
    m.unet.requires_grad_(True)
    m.unet.train()
    opt = torch.optim.AdamW(m.unet.parameters(), lr=2e-6)
    vae, _ = m.vae, m.text

    def step():
        i = torch.randint(0, N_LATENTS, (batch,), device=dev, generator=gen)
        j = torch.randint(0, N_PROMPTS, (batch,), device=dev, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
        with autocast(m):
            latents = vae.encode(pixels[i]).latent_dist.sample(generator=gen) * 0.18215
            noise = torch.randn(latents.shape, device=dev, generator=gen)
            states, kw = m.encode_text(ids[j])
            controller.probs, controller.positions = [], positions[j]
            m.unet(m.sched.add_noise(latents, noise, t), t, encoder_hidden_states=states, **kw)
            loss = controller.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    def close():
        m.unet.set_attn_processor(dict(originals))
        m.unet.requires_grad_(False)
        m.unet.eval()
        opt.state.clear()

    return step, close


def ti_steps(m: Model, steps: int, batch: int):
    dev = m.device
    gen = torch.Generator(dev).manual_seed(0)
    latents, _, _, _ = cached_inputs(m, gen)
    ids = torch.randint(0, VOCAB - 2, (N_PROMPTS, SEQ), generator=gen, device=dev)
    slots = list(range(CONCEPT_POS, CONCEPT_POS + 4))
    vecs, hooks = [], []
    for enc in m.text:
        emb = enc.get_input_embeddings()
        v = emb.weight[:4].detach().clone().requires_grad_(True)
        vecs.append(v)

        def hook(_mod, _inp, out, v=v):
            out = out.clone()
            out[:, slots] = v.to(out.dtype)
            return out

        hooks.append(emb.register_forward_hook(hook))
    opt = torch.optim.AdamW(vecs, lr=1e-3, weight_decay=0.0)

    def step():
        i = torch.randint(0, N_LATENTS, (batch,), device=dev, generator=gen)
        j = torch.randint(0, N_PROMPTS, (batch,), device=dev, generator=gen)
        t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
        noise = torch.randn(latents[i].shape, device=dev, generator=gen)
        with autocast(m):
            states, kw = m.encode_text(ids[j])
            pred = m.unet(
                m.sched.add_noise(latents[i], noise, t), t, encoder_hidden_states=states, **kw
            ).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def close():
        for h in hooks:
            h.remove()

    return step, close


BF16 = False


def autocast(m: Model):
    return torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=BF16)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(m: Model, impl: str, steps: int, batch: int, warmup: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    make = {"ours": ours_steps, "original": original_steps, "ti": ti_steps}[impl]
    dev = m.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_mb = torch.cuda.memory_allocated() / 2**20
    with PeakRSS() as mem:
        t_setup = time.perf_counter()
        step, close = make(m, steps, batch)
        sync(dev)
        setup = time.perf_counter() - t_setup
        flops = None
        try:
            for k in range(warmup):
                if k == 0:
                    with FlopCounterMode(display=False) as fc:
                        step()
                    flops = fc.get_total_flops()
                else:
                    step()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            sync(dev)
            seconds = time.perf_counter() - t0
            loss = float(loss)
        finally:
            close()
    if flops is None:  # no warm-up: count on a step of its own, not timed
        step, close = make(m, 1, batch)
        with FlopCounterMode(display=False) as fc:
            step()
        close()
        flops = fc.get_total_flops()
    row = {
        "size": m.size,
        "impl": impl,
        "device": dev.type,
        "bf16": BF16,
        "batch": batch,
        "steps": steps,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / steps, 4),
        "setup_seconds": round(setup, 2),
        "gflop_per_step": round(flops / 1e9, 1),
        "tflops": round(flops * steps / seconds / 1e12, 2),
        "loss": loss,
    }
    if dev.type == "cuda":
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["peak_gpu_above_model_mb"] = round(row["peak_gpu_mb"] - start_mb, 1)
    row["peak_rss_above_start_mb"] = round(mem.mb, 1)
    row["process_maxrss_mb"] = round(maxrss_mb(), 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    global BF16
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), nargs="+", default=["sd15"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--impls", nargs="+", default=["ours", "original"], choices=["ours", "original", "ti"]
    )
    ap.add_argument("--steps", type=int, default=1, help="timed steps per impl")
    ap.add_argument("--ti-steps", type=int, default=None, help="timed steps for ti")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (GPU: 1+)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    ap.add_argument("--out", default="bench/results/sd15.json")
    args = ap.parse_args()
    BF16 = args.bf16
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, t_start = [], time.time()
    for size in args.size:
        t = time.perf_counter()
        m = Model(size, dev)
        build = time.perf_counter() - t
        n_params = sum(p.numel() for p in m.unet.parameters())
        for impl in args.impls:
            steps = args.ti_steps if impl == "ti" and args.ti_steps else args.steps
            row = run(m, impl, steps, args.batch, args.warmup)
            row.update(unet_params_m=round(n_params / 1e6, 1), build_seconds=round(build, 1))
            rows.append(row)
        del m
    result = {
        "rows": rows,
        "machine": machine(args.threads),
        "threads": args.threads,
        "commit": git_commit(),
        "args": vars(args),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    cols = [
        "size",
        "impl",
        "device",
        "bf16",
        "batch",
        "steps",
        "seconds_per_step",
        "seconds",
        "gflop_per_step",
        "tflops",
        "peak_rss_above_start_mb",
        "process_maxrss_mb",
    ]
    if dev.type == "cuda":
        cols += ["peak_gpu_mb"]
    write_results(Path(args.out), result, markdown_table(rows, cols), "Re-steering at SD sizes")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
