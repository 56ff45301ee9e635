"""Train the embedded world from scratch: autoencoder, UNet + text encoder, classifier.

Run through `fmn world build --out DIR [--world NAME]`. Each stage saves its result and a
re-run skips the stages already on disk; the long UNet stage also saves a checkpoint every
`checkpoint_every` steps and resumes from it, so a crash costs at most that many steps.
Losses go to `DIR/train_log.jsonl`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from fmn.io import atomic_dir, write_json
from fmn.model.conditioning import token_ids
from fmn.progress import Progress
from fmn.world import token_rows
from fmn.world.classifier import WorldClassifier, augment
from fmn.world.concepts import World, get_world
from fmn.world.generator import IMAGE_SIZE, dataset, label_heads
from fmn.world.tokenizer import load_tokenizer, write_clip_tokenizer_files


@dataclass
class WorldConfig:
    world: str = "tiny-world"  # which concept table (fmn.world.concepts.WORLDS)
    seed: int = 0
    # autoencoder: 32 px -> 8x8x4 latents; two downsamplings keep the UNet cheap on CPU
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 800  # reconstruction error flattens out around here
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # just enough to keep the latent scale bounded
    # UNet: three levels at 8x8/4x4/2x2, seven cross-attention (attn2) modules
    unet_channels: tuple[int, ...] = (64, 96, 128)
    # text encoder: real CLIP vocabulary, small width; most of its weights are the token table
    text_width: int = 64
    text_layers: int = 3
    text_ff_mult: int = 4  # the MLP's width over text_width (CLIP: 4)
    # train only the token rows captions use; the rest come from a seed (fmn.world.token_rows)
    trained_rows_only: bool = False
    max_length: int = 32  # world captions are under 16 tokens; 32 leaves room for users
    n_train: int = 40000  # distinct training images (latents cached once)
    unet_steps: int = 2200
    unet_batch: int = 128
    unet_lr: float = 8e-4  # the largest that stayed stable in the feasibility probe
    warmup: int = 100
    caption_dropout: float = 0.1  # empty prompt, so classifier-free guidance works
    min_snr_gamma: float = 5.0  # min-SNR weighting: faster convergence at small scale
    ema_decay: float = 0.999
    # classifier: half of each batch goes through the autoencoder, so blur is familiar
    clf_steps: int = 1000
    clf_batch: int = 128
    clf_lr: float = 2e-3
    clf_width: int = 48
    checkpoint_every: int = 250  # UNet steps between resumable checkpoints


STAGES = ("vae", "unet", "classifier")


class BuildPaused(Exception):
    """The build stopped at a UNet checkpoint because its time was up; run it again to go
    on from there."""


def world_config(world: str, *, quick: bool = False) -> WorldConfig:
    """The settings a world is built with; quick: a few steps per stage (plumbing only)."""
    cfg = crowd_config() if world == "crowd-world" else WorldConfig(world=world)
    if quick:
        cfg = replace(cfg, vae_steps=3, unet_steps=3, clf_steps=3, n_train=512, checkpoint_every=1)
    return cfg


def crowd_config(**overrides) -> WorldConfig:
    """crowd-world's settings: more portraits and steps for 192 identities; text states
    wider (256) than the world has concepts (216), as SD's (768) are wider than the
    hundreds of concepts the field removes, so that a key/value edit is not ruled out by
    construction; the token table's untrained rows come from a seed and the MLP is
    half CLIP's ratio, which keeps both shipped worlds under 40 MB. Sizes and step counts
    are budget choices (docs/world.md)."""
    base = {
        "world": "crowd-world",
        "text_width": 256,
        "text_ff_mult": 2,
        "trained_rows_only": True,
        "n_train": 60000,
        "unet_steps": 5000,
        "clf_steps": 1500,
        "clf_width": 64,
    }
    return WorldConfig(**(base | overrides))


def _log(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_vae(cfg: WorldConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet(cfg: WorldConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=4,
        norm_num_groups=32,
    )


VOCAB = 49408  # CLIP's
BOS, EOS = 49406, 49407


def make_text_encoder(cfg: WorldConfig, used: torch.Tensor | None = None) -> CLIPTextModel:
    """The world's text encoder over CLIP's vocabulary, or, given `used` (sorted token ids),
    over those ids only, renumbered (fmn.world.token_rows.compact_ids)."""
    vocab, bos, eos = VOCAB, BOS, EOS
    if used is not None:
        vocab = len(used)
        bos, eos = (int(torch.searchsorted(used, t)) for t in (BOS, EOS))
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * cfg.text_ff_mult,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_length,
            projection_dim=cfg.text_width,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def _full_vocab(cfg: WorldConfig, compact: CLIPTextModel, used: torch.Tensor) -> CLIPTextModel:
    """The compact encoder's weights in a full-vocabulary encoder: trained rows at their
    ids, seeded rows elsewhere (fmn.world.token_rows)."""
    full = make_text_encoder(cfg)
    state = compact.state_dict()
    key = next(k for k in state if k.endswith(token_rows.TABLE_KEY))
    state[key] = token_rows.full_table(state[key], used, VOCAB)
    full.load_state_dict(state)
    return full.eval()


def train_vae(cfg: WorldConfig, out: Path, progress: Progress) -> AutoencoderKL:
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    world = get_world(cfg.world)
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, 50)
        x = _to_tensor(dataset(cfg.vae_batch, int(rng.integers(2**31)), world=world)["images"])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l_rec = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = l_rec + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            _log(out, {"stage": "vae", "step": step, "rec": l_rec.item()})
        progress("autoencoder", step + 1, cfg.vae_steps, {"rec": l_rec.item()})
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """Posterior means and std of every training image, so UNet steps never run the VAE."""
    stats = []
    for i in range(0, len(images), batch):
        d = vae.encode(_to_tensor(images[i : i + batch])).latent_dist
        stats.append(torch.cat([d.mean, d.std], dim=1))
    return torch.cat(stats)


def _save_checkpoint(path: Path, step: int, modules, ema, opt, gen: torch.Generator) -> None:
    """Everything the UNet loop needs to go on from `step`: weights, EMA, Adam moments and
    the data generator's state, written to a temp folder and swapped in (fmn.io)."""
    tensors = {f"p{i}": p.detach() for i, p in enumerate(modules)}
    tensors |= {f"e{i}": e for i, e in enumerate(ema)}
    for i, p in enumerate(modules):
        st = opt.state.get(p)
        if st:
            tensors |= {f"m{i}": st["exp_avg"], f"v{i}": st["exp_avg_sq"], f"s{i}": st["step"]}
    tensors["gen"] = gen.get_state()
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        write_json(tmp / "step.json", {"step": step})


def _load_checkpoint(path: Path, modules, ema, opt, gen: torch.Generator) -> int:
    """Restore a checkpoint written by _save_checkpoint; returns the next step (0: none)."""
    if not (path / "step.json").is_file():
        return 0
    t = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(modules):
            p.copy_(t[f"p{i}"])
            ema[i].copy_(t[f"e{i}"])
            if f"m{i}" in t:
                opt.state[p] = {"exp_avg": t[f"m{i}"], "exp_avg_sq": t[f"v{i}"], "step": t[f"s{i}"]}
    gen.set_state(t["gen"])
    return int(json.loads((path / "step.json").read_text())["step"])


def train_unet(
    cfg: WorldConfig,
    vae: AutoencoderKL,
    tokenizer,
    out: Path,
    progress: Progress,
    deadline: float | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """UNet and text encoder jointly, epsilon prediction, min-SNR weighting, EMA.
    Resumes from `out/unet.ckpt` when a crash or a pause left one. Past `deadline` (a
    time.time()), it stops at the next checkpoint with BuildPaused."""
    torch.manual_seed(cfg.seed)
    data = dataset(cfg.n_train, cfg.seed + 2, world=get_world(cfg.world))
    stats = encode_dataset(vae, data["images"])
    scale = 1.0 / stats[:, :4].std().item()
    vae.register_to_config(scaling_factor=scale)
    captions = [
        c if r > cfg.caption_dropout else ""
        for c, r in zip(
            data["captions"], np.random.default_rng(cfg.seed).random(cfg.n_train), strict=True
        )
    ]
    ids = token_ids(tokenizer, captions, cfg.max_length)
    used = None
    if cfg.trained_rows_only:
        used, ids = token_rows.compact_ids(ids)
    unet, text = make_unet(cfg), make_text_encoder(cfg, used)
    params = [*unet.parameters(), *text.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = out / "unet.ckpt"
    start = _load_checkpoint(ckpt, params, ema, opt, gen)
    if start:
        _log(out, {"stage": "unet", "resumed_at": start})
    for step in range(start, cfg.unet_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * _cosine(step, cfg.unet_steps, cfg.warmup)
        idx = torch.randint(0, cfg.n_train, (cfg.unet_batch,), generator=gen)
        mean, std = stats[idx, :4], stats[idx, 4:]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        cond = text(ids[idx])[0]
        pred = unet(noisy, t, cond).sample
        w = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            _log(out, {"stage": "unet", "step": step, "loss": loss.item()})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            _save_checkpoint(ckpt, step + 1, params, ema, opt, gen)
            if deadline is not None and time.time() >= deadline:
                _log(out, {"stage": "unet", "paused_at": step + 1})
                raise BuildPaused(
                    f"paused after UNet step {step + 1} of {cfg.unet_steps} (time is up); "
                    "run the same command again to go on from there"
                )
        progress("unet+text", step + 1, cfg.unet_steps, {"loss": loss.item()})
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    if used is not None:
        text = _full_vocab(cfg, text, used)
    return unet.eval(), text.eval()


@torch.no_grad()
def roundtrip(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Images as the generator's decoder would render them (blurred by the 8x8 bottleneck)."""
    return vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1)


def classifier_heads(world: World) -> dict[str, list[str]]:
    """The classifier's heads: the world's concept heads, then its identity attributes
    (auxiliary targets that teach the features what tells neighbours apart)."""
    return {h: (world.heads.get(h) or world.attributes[h]) for h in label_heads(world)}


def train_classifier(
    cfg: WorldConfig, vae: AutoencoderKL, out: Path, progress: Progress
) -> WorldClassifier:
    torch.manual_seed(cfg.seed)
    world = get_world(cfg.world)
    clf = WorldClassifier(cfg.clf_width, classifier_heads(world))
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.clf_lr, weight_decay=1e-4)
    rng = np.random.default_rng(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    for step in range(cfg.clf_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.clf_lr * _cosine(step, cfg.clf_steps, 50)
        d = dataset(cfg.clf_batch, int(rng.integers(2**31)), world=world)
        x = _to_tensor(d["images"])
        half = cfg.clf_batch // 2
        x = torch.cat([roundtrip(vae, x[:half]), x[half:]])
        logits = clf(augment(x, gen))
        loss = sum(F.cross_entropy(logits[h], torch.from_numpy(d["labels"][h]) + 1) for h in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.clf_steps - 1:
            _log(out, {"stage": "classifier", "step": step, "loss": loss.item()})
        progress("classifier", step + 1, cfg.clf_steps, {"loss": loss.item()})
    return clf.eval()


def build_world(
    out: Path,
    cfg: WorldConfig,
    progress: Progress,
    until: str | None = None,
    minutes: float | None = None,
) -> Path:
    """Train every part of the world into `out` (a diffusers pipeline dir + classifier/);
    `until` stops after that stage (a stage already on disk is never trained again).
    `minutes`: past that, the UNet stage stops at its next checkpoint (BuildPaused), so a
    long stage can run in pieces of a chosen length."""
    from diffusers import StableDiffusionPipeline

    from fmn.world.classifier import load_classifier, save_classifier

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    previous = out / "world_config.json"
    settings = json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists, as on disk
    if previous.is_file() and json.loads(previous.read_text()) != settings:
        raise ValueError(
            f"{out} holds a build with other settings ({previous}); resume it with the same "
            "options, or pick another --out"
        )
    write_json(previous, asdict(cfg))
    t0 = time.time()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        write_clip_tokenizer_files(tok_dir, cfg.max_length)
    tokenizer = load_tokenizer(tok_dir, cfg.max_length)
    if (out / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
    else:
        vae = train_vae(cfg, out, progress)
        vae.save_pretrained(out / "vae.partial")
        (out / "vae.partial").rename(out / "vae")
    _log(out, {"stage": "vae", "done_s": time.time() - t0})
    if until == "vae":
        return out
    if not (out / "unet" / "config.json").exists():
        deadline = None if minutes is None else t0 + 60 * minutes
        unet, text = train_unet(cfg, vae, tokenizer, out, progress, deadline)
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            unet=unet,
            text_encoder=text,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out)  # vae is re-saved with its fitted scaling_factor
        shutil.rmtree(out / "unet.ckpt", ignore_errors=True)
    _log(out, {"stage": "unet", "done_s": time.time() - t0})
    if until == "unet":
        return out
    if not (out / "classifier" / "model.safetensors").exists():
        vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
        clf = train_classifier(cfg, vae, out, progress)
        with atomic_dir(out / "classifier") as tmp:
            save_classifier(clf, tmp)
    load_classifier(out / "classifier")
    _log(out, {"stage": "classifier", "done_s": time.time() - t0})
    return out
