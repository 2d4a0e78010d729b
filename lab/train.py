"""Train the bundled tiny-shapes model: `python -m lab.train --out DIR --seed S --minutes M` (from the repo root)."""

import argparse
import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcli.refiner import clean_and_noise, matched_timesteps
from diffcli.shapes import world
from lab import models
from lab.tokenizer import build_tokenizer

BASE, UPSCALER = "tiny-shapes", "tiny-shapes-x4"
DEFAULTS = {"description": "Tiny text-to-image model of coloured shapes trained by diffcli (docs/bundled-model.md)",
            "steps": 14, "cfg": 3.0, "scheduler": "euler-a", "width": 128, "height": 128}  # measured best (docs/bundled-model.md)


@dataclass
class Run:
    """One invocation's settings; defaults are what the H100 run used."""

    out: Path
    seed: int = 0
    minutes: float = 9.0
    stage: str = "all"
    resume: Path | None = None
    smoke: bool = False  # tiny networks, CPU friendly, for tests
    max_steps: int = 10**9
    batch: int = 512  # launch-bound on an H100: bigger batches are nearly free
    lr: float = 8e-4
    vae_batch: int = 64
    vae_lr: float = 1e-3
    pool: int = 100_000  # scenes drawn once; jitter makes them distinct
    caption_dropout: float = 0.1  # empty captions for classifier-free guidance
    ema: float = 0.995
    edge_weight: float = 0.0  # decoder stage: extra loss weight on outline pixels
    schedule: str = "epsilon"  # base model: "epsilon" (SD 1.x, the bundled model's) or "zero-snr" (v-prediction)
    focus: tuple | None = None  # (size index or None for either, shape index) put into a share of scenes
    focus_share: float = 0.0
    focus_one_object: bool = False  # only one-object scenes may get the focus object
    relation_head: float = 0.0  # weight of the text encoder's auxiliary relation loss (see _relation_loss)
    distill_below: int = 0  # unet stage: below this timestep the target is the teacher's estimate (Teacher)
    teacher: Path | None = None  # the teacher's folder when it is not --resume
    distill_share: float | None = None  # share of timesteps drawn below distill_below (None: uniform over all)
    anchor_text: float = 0.0  # weight of the text encoder's pull toward the resumed one's output (see _anchor_loss)
    crop: int = 128  # upscaler: output px of a training crop (a quarter of that in), sizes 2/3-8/3 of it drawn
    vae_share: float = 0.25  # upscaler: share of the time its VAE trains first (with --resume, 0 keeps the VAE)
    keep_latents: bool = False  # upscaler with --resume: train the VAE's decoder only (the UNet's latents stay)
    consistency: float = 0.0  # upscaler: weight of the tiled-vs-whole agreement losses (train_upscale_vae, _upscaler)


def device() -> torch.device:
    """CUDA when present."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev):
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")


class Pool:
    """Scenes, their captions' token ids, rendered on the device per batch."""

    def __init__(self, n, seed, tokenizer, dev, focus=None, focus_share=0.0, focus_one_object=False):
        rng = random.Random(seed)
        scenes = [world.sample_scene(rng, rng.random() < 0.5) for _ in range(n)]
        for s in scenes:  # oversample a hard shape (of one size, or any): one object of a share of scenes is made it
            if focus and not (focus_one_object and len(s.objects) > 1) and rng.random() < focus_share:
                o = rng.choice(s.objects)
                o.size, o.shape = rng.randrange(len(world.SIZES)) if focus[0] is None else focus[0], focus[1]
        captions = [world.caption(rng, s) for s in scenes]
        self.t = world.to_tensors(scenes, dev)
        self.ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(dev)
        self.empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids.to(dev)
        self.relation_marks = relation_marks(self.ids, tokenizer, scenes)
        self.n, self.gen = n, torch.Generator(dev).manual_seed(seed)

    def batch(self, b, dropout=0.0):
        """Images in [-1, 1], caption ids (a fraction `dropout` of captions emptied) and relation marks: the
        relation's index + 1 at the tokens that follow a two-object caption's relation word, through end of text."""
        idx = torch.randint(0, self.n, (b,), device=self.ids.device, generator=self.gen)
        drop = (torch.rand(b, device=self.ids.device, generator=self.gen) < dropout)[:, None]
        ids = torch.where(drop, self.empty, self.ids[idx])
        marks = torch.where(drop, 0, self.relation_marks[idx])
        return world.render({k: v[idx] for k, v in self.t.items()}) * 2 - 1, ids, marks


def relation_marks(ids: torch.Tensor, tokenizer, scenes) -> torch.Tensor:
    """Per caption (token ids of the captioned `scenes`): the relation's index + 1 at each token after its first
    relation word ("left", "right", "above", "over", "below", "under") through the end-of-text token, else 0; all 0
    for one object, or two joined by "and"."""
    words = {w.split()[-2] if w.endswith(" of") else w for ws in world.RELATION_WORDS.values() for w in ws}
    said = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids([w + "</w>" for w in sorted(words)]),
                                        device=ids.device)).int()
    end = (ids == tokenizer.eos_token_id).int()
    relation = torch.tensor([s.relation + 1 if len(s.objects) == 2 and s.said["relation"] else 0 for s in scenes],
                            device=ids.device)
    return (((said.cumsum(1) - said) > 0) & ((end.cumsum(1) - end) == 0)).long() * relation[:, None]


class Logger:
    """Losses and minutes of one stage, written as JSON after every report."""

    def __init__(self, run: Run, stage: str, **info):
        self.path, self.t0 = run.out / f"log_{stage}.json", time.time()
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        cfg = {k: str(v) for k, v in asdict(run).items()}
        self.data = {"stage": stage, "device": gpu, "run": cfg, **info, "steps": 0, "losses": []}

    def log(self, step, loss, **extra):
        """Record [step, loss, minutes] and rewrite the file."""
        self.data["losses"].append([step, round(loss, 5), round((time.time() - self.t0) / 60, 3)])
        self.data.update(extra)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"{self.data['stage']} step {step} loss {loss:.4f} {self.data['losses'][-1][2]:.2f} min", flush=True)


def loop(step_fn, deadline, run, logger, params, every=50):
    """Call `step_fn` until the deadline or max_steps, logging the mean loss; leaves the EMA in `params`."""
    ema = [p.detach().clone() for p in params]
    step, acc = 0, []
    while time.time() < deadline and step < run.max_steps:
        acc.append(step_fn(step))
        step += 1
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(run.ema, (1 + step) / (10 + step)))
        if step % every == 0 or step == run.max_steps:
            logger.log(step, torch.stack(acc).mean().item(), steps=step)
            acc = []
    if acc:
        logger.log(step, torch.stack(acc).mean().item(), steps=step)
    with torch.no_grad():
        torch._foreach_copy_(params, ema)


def optimizer(params, lr, dev):
    """AdamW, fused on CUDA, with a short warm-up."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    return opt, sched


def train_vae(run: Run, deadline, name=BASE, decoder_only=False):
    """Train an AutoencoderKL on rendered scenes (MSE + small KL); set its latent scaling factor.

    `decoder_only` fine-tunes the decoder of a resumed VAE (L1 + MSE), keeping its latent space and scale.
    """
    from diffusers import AutoencoderKL

    dev = device()
    torch.manual_seed(run.seed)
    src = run.resume / name / "vae" if run.resume else None
    vae = AutoencoderKL.from_pretrained(src, dtype=torch.float32) if src else models.vae(run.smoke)
    vae.to(dev).train()
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    pool = Pool(min(run.pool, 20_000), run.seed + 1, _tokenizer(run, name), dev, run.focus, run.focus_share,
                run.focus_one_object)
    opt, sched = optimizer(params, run.vae_lr, dev)
    logger = Logger(run, f"vae_{name}", params=models.n_params(vae))

    def step(i):
        x = pool.batch(run.vae_batch)[0]
        with autocast(dev):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        if decoder_only:  # L1 + MSE, pixels near outlines weighted 1 + edge_weight (small shapes are mostly outline)
            err = (rec.float() - x).abs()
            w = 1 + run.edge_weight * outlines(x)
            loss = (w * (err + err**2)).mean() / w.mean()
        else:
            loss = F.mse_loss(rec.float(), x) + 1e-5 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    loop(step, deadline, run, logger, params)
    vae.eval()
    with torch.no_grad():
        z = vae.encode(pool.batch(8 if run.smoke else 128)[0]).latent_dist.sample()
        x = pool.batch(8 if run.smoke else 64)[0]
        logger.data["recon_mse"] = F.mse_loss(vae(x).sample, x).item()
    std = z.std().item()
    if not decoder_only:
        vae.register_to_config(scaling_factor=round(1 / std, 5))
    logger.log(logger.data["steps"], logger.data["losses"][-1][1] if logger.data["losses"] else math.nan,
               latent_std=std, scaling_factor=vae.config.scaling_factor)
    vae.half().save_pretrained(run.out / name / "vae", safe_serialization=True)
    return vae


def outlines(x: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """1 where a (2r+1)-pixel window holds more than one colour (object outlines), else 0; shape N x 1 x H x W."""
    k = 2 * radius + 1
    spread = F.max_pool2d(x, k, 1, radius) + F.max_pool2d(-x, k, 1, radius)
    return (spread.amax(dim=1, keepdim=True) > 0.1).float()


def _rescale_latents(vae, k):
    """Multiply the latent space by k exactly: mean and std out of quant_conv, 1/k into post_quant_conv."""
    with torch.no_grad():
        q, pq = vae.quant_conv, vae.post_quant_conv
        q.weight[:4] *= k
        q.bias[:4] *= k
        q.bias[4:] += 2 * math.log(k)
        pq.weight *= 1 / k


def _save(pipe, path: Path):
    """Save fp16 safetensors; the text encoder's config says float32 so a plain from_pretrained matches diffusers."""
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    cfg = path / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))


def _tokenizer(run: Run, name: str):
    """The model's CLIPTokenizer: the resumed model's own (its text encoder learned those ids), else a new build.

    A new build can number tokens differently from the last (the BPE trainer breaks ties in hash order), so a
    resumed model never gets one.
    """
    from transformers import CLIPTokenizer

    path = run.out / name / "tokenizer"
    resumed = run.resume / name / "tokenizer" if run.resume else None
    if resumed and resumed.is_dir() and not path.exists():  # vocab.json/merges.txt too: transformers 4 reads them
        shutil.copytree(resumed, path)
    return CLIPTokenizer.from_pretrained(path if (path / "vocab.json").is_file() else build_tokenizer(path))


def _load_vae(run: Run, name, dev):
    """The frozen VAE of this run's output folder, else of the resumed one."""
    from diffusers import AutoencoderKL

    path = run.out / name / "vae"
    path = path if path.exists() else run.resume / name / "vae"
    return AutoencoderKL.from_pretrained(path, dtype=torch.float32).to(dev).eval().requires_grad_(False)


def _data_target(sched, latents, noise, t):
    """What the model learns to predict from the data: the noise, or for v-prediction the velocity."""
    return sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise


def _diffusion_loss(pred, noise, t, sched, latents=None, pixel_weights=None, target=None):
    """Epsilon MSE with min-SNR-5 weighting (Hang et al. 2023); for v-prediction, v MSE weighted so the x0 error
    counts clamp(SNR, 1, 5) times (at low SNR min-SNR would weight x0 by SNR, ~0 near pure noise). `pixel_weights`
    (N, 1, h, w) weight each latent position's error; `target` (a teacher's prediction) replaces the data's."""
    snr = sched.alphas_cumprod.to(t.device)[t] / (1 - sched.alphas_cumprod.to(t.device)[t])
    w = snr.clamp(1.0, 5.0) / (snr + 1) if sched.config.prediction_type == "v_prediction" else snr.clamp(max=5.0) / snr
    target = _data_target(sched, latents, noise, t) if target is None else target
    error = (pred.float() - target) ** 2
    if pixel_weights is not None:
        error = error * pixel_weights
    return (w * error.mean(dim=(1, 2, 3))).mean()



def _relation_loss(head, states, marks):
    """Cross-entropy of a linear head reading the relation from the text encoder's output at the tokens after a
    two-object caption's relation word (`Pool.batch` marks). The encoder is causal, so only those tokens can carry
    which object goes where; trained on the diffusion loss alone it had all but erased it there (a change of 0.015
    at the second object's words when "left of" became "right of", `python -m lab.relation_probe`)."""
    chosen = marks > 0
    if not chosen.any():
        return states.new_zeros((), dtype=torch.float32)
    return F.cross_entropy(head(states[chosen].float()), marks[chosen] - 1)


class Teacher:
    """The --teacher (default --resume) model, frozen. Below `--distill-below` its estimate of the clean latents
    replaces the data as the target, so a run keeps or regains what that model draws well (small stars) while the high
    noise levels learn something new (a new schedule, the relation). Its timesteps are matched to this run's by the
    nearest alphas_cumprod."""

    def __init__(self, path: Path, sched, dev):
        te, unet = models.load_text_and_unet(path)
        self.te, self.unet = te.to(dev).eval(), unet.to(dev).eval()
        own = models.saved_schedule(path)
        self.v = own["prediction_type"] == "v_prediction"
        self.alphas = models.noise_scheduler(own).alphas_cumprod.to(dev)
        self.run_alphas = sched.alphas_cumprod.to(dev)
        self.timestep = matched_timesteps(self.run_alphas, self.alphas)

    @torch.no_grad()
    def targets(self, noisy, t, ids=None, states=None):
        """(clean latents, noise) as the teacher sees `noisy` at this run's timesteps `t`, given caption ids (or its
        text encoder's `states`); they remake `noisy`."""
        own_t = self.timestep[t]
        with autocast(noisy.device):
            pred = self.unet(noisy, own_t, self.te(ids)[0] if states is None else states).sample.float()
        view = (-1, 1, 1, 1)
        return clean_and_noise(pred, noisy, self.alphas[own_t].view(view), self.v, self.run_alphas[t].view(view))


def _anchor_loss(anchor, states, ids, marks):
    """Squared change of the text encoder's output from the frozen `anchor` encoder's, relative to the anchor's
    variance, at the tokens `_relation_loss` leaves alone (marks 0): the relation can move in, while a UNet trained
    on the old encoder (the bundled refiner) still reads every other token as before."""
    with torch.no_grad():
        old = anchor(ids)[0].float()
    keep = (marks == 0).unsqueeze(-1).float()
    return (((states.float() - old) ** 2) * keep).sum() / (keep.sum() * old.shape[-1]) / old.var()


def _timesteps(n, total, below, share, dev):
    """`n` training timesteps, uniform over [0, total), or with a `share` of them uniform below `below` and the rest
    uniform above it."""
    if share is None:
        return torch.randint(0, total, (n,), device=dev)
    low = torch.rand(n, device=dev) < share
    return torch.where(low, torch.randint(0, below, (n,), device=dev), torch.randint(below, total, (n,), device=dev))


def _optimize(loss, opt, params, lr_sched):
    """One clipped optimiser and schedule step; returns the detached loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lr_sched.step()
    return loss.detach()

def train_unet(run: Run, deadline):
    """Train the text encoder and UNet jointly on frozen-VAE latents; save the whole SD pipeline."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    dev = device()
    torch.manual_seed(run.seed)
    tok = _tokenizer(run, BASE)
    vae = _load_vae(run, BASE, dev)
    if run.resume:
        te, unet = models.load_text_and_unet(run.resume / BASE)
    else:
        te = models.text_encoder(len(tok), run.smoke)
        unet = models.unet(te.config.hidden_size, run.smoke)
    te.to(dev).train()
    unet.to(dev).train()
    schedule = models.ZERO_SNR_NOISE if run.schedule == "zero-snr" else models.NOISE
    sched = models.noise_scheduler(schedule)
    pool = Pool(run.pool, run.seed + 2, tok, dev, run.focus, run.focus_share, run.focus_one_object)
    teacher = Teacher((run.teacher or run.resume) / BASE, sched, dev) if run.distill_below else None
    params = list(te.parameters()) + list(unet.parameters())
    head = torch.nn.Linear(te.config.hidden_size, len(world.RELATIONS)).to(dev) if run.relation_head else None
    trained = params + (list(head.parameters()) if head else [])  # the head is not saved
    anchor = copy.deepcopy(te).eval().requires_grad_(False) if run.anchor_text else None
    opt, lr_sched = optimizer(trained, run.lr, dev)
    logger = Logger(run, "unet", params_unet=models.n_params(unet), params_text=models.n_params(te), batch=run.batch)
    sf = vae.config.scaling_factor

    def step(i):
        x, ids, marks = pool.batch(run.batch, run.caption_dropout)
        with torch.no_grad(), autocast(dev):
            lat = vae.encode(x).latent_dist.sample().float() * sf
        eps = torch.randn_like(lat)
        t = _timesteps(lat.shape[0], sched.config.num_train_timesteps, run.distill_below, run.distill_share, dev)
        noisy = sched.add_noise(lat, eps, t)
        low = t < run.distill_below
        if low.any():
            lat, eps = lat.clone(), eps.clone()
            lat[low], eps[low] = teacher.targets(noisy[low], t[low], ids[low])
        with autocast(dev):
            states = te(ids)[0]
            pred = unet(noisy, t, states).sample
        loss = _diffusion_loss(pred, eps, t, sched, lat)
        if head:
            loss = loss + run.relation_head * _relation_loss(head, states, marks)
        if anchor is not None:
            loss = loss + run.anchor_text * _anchor_loss(anchor, states, ids, marks)
        return _optimize(loss, opt, trained, lr_sched)

    loop(step, deadline, run, logger, params)
    sampler = DPMSolverMultistepScheduler.from_config(schedule)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _save(pipe, run.out / BASE)
    (run.out / BASE / "diffcli.json").write_text(json.dumps(DEFAULTS, indent=1))


# x4 upscaler training pairs: a crop of a scene drawn at ZOOM x 128 px (the target) and its 4x box average (the
# input). Zoom 1 is a whole scene as a 32 px input, zoom 4 a crop of a 128 px input (what tiny-shapes draws): trained
# on zoom 1 alone, the first weights turned 128 px inputs into wrong colours and invented shapes.
UPSCALE_ZOOM = (1.0, 4.5)
UPSCALE_COLOUR_JITTER = (0.1, 0.04)  # per-channel gain and offset spread: generated images are off the world's palette
UPSCALE_LOW_LEVELS = 50  # half the noise levels trained on are below this: the CLI's default is 20


def render_crops(t: dict, zoom: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, size: int) -> torch.Tensor:
    """A size x size window of each packed scene drawn at `zoom` x world.SIZE px, its corner at (x0, y0) px of that
    drawing; (N, 3, size, size) in [0, 1], anti-aliased over one output pixel like `world.render` (zoom 1 at 0, 0
    and size 128 is `world.render`)."""
    dev = t["background"].device
    palette = torch.tensor(list(world.COLOURS.values()), dtype=torch.float32, device=dev) / 255
    z = zoom[:, None, None]
    steps = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    xx = ((x0[:, None, None] + steps[None, None, :]) / z).expand(-1, size, size)
    yy = ((y0[:, None, None] + steps[None, :, None]) / z).expand(-1, size, size)
    img = palette[t["background"]][:, :, None, None].expand(-1, -1, size, size)
    for k in range(2):
        r = torch.tensor(world.RADIUS, device=dev)[t["size"][:, k]][:, None, None].expand(-1, size, size)
        d = world.shape_sdf(t["shape"][:, k][:, None, None].expand(-1, size, size),
                            xx - t["x"][:, k, None, None], yy - t["y"][:, k, None, None], r)
        alpha = ((0.5 - d * z).clamp(0, 1) * t["present"][:, k, None, None])[:, None]
        img = img * (1 - alpha) + palette[t["colour"][:, k]][:, :, None, None] * alpha
    return img


def upscale_batch(pool: "Pool", b: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, input) in [-1, 1]: size x size crops of pool scenes at a random zoom (half log-uniform over
    UPSCALE_ZOOM, half within 0.5 of 4, the 128 px inputs), half of them placed anywhere and half around the first
    object (a zoomed scene is mostly background), colour-jittered, and their 4x box averages rounded to 8 bits like
    the PNG a user passes."""
    dev, gen = pool.ids.device, pool.gen
    idx = torch.randint(0, pool.n, (b,), device=dev, generator=gen)
    t = {k: v[idx] for k, v in pool.t.items()}
    u = torch.rand(7, b, device=dev, generator=gen)
    lo, hi = UPSCALE_ZOOM
    zoom = torch.where(u[0] < 0.5, lo * (hi / lo) ** u[1], 3.5 + u[1]).clamp(min=size / world.SIZE)
    room = world.SIZE * zoom - size
    near = u[4] < 0.5
    x0 = torch.where(near, t["x"][:, 0] * zoom - size * u[5], u[2] * room).clamp(min=0).minimum(room)
    y0 = torch.where(near, t["y"][:, 0] * zoom - size * u[6], u[3] * room).clamp(min=0).minimum(room)
    high = render_crops(t, zoom, x0, y0, size)
    spread_gain, spread_offset = UPSCALE_COLOUR_JITTER
    jitter = torch.rand(2, b, 3, 1, 1, device=dev, generator=gen) * 2 - 1
    high = (high * (1 + spread_gain * jitter[0]) + spread_offset * jitter[1]).clamp(0, 1)
    low = (F.interpolate(high, scale_factor=0.25, mode="area") * 255).round() / 255
    return high * 2 - 1, low * 2 - 1


def upscale_crops(crop: int) -> list[int]:
    """Training crop sizes (output px, multiples of 16): 2/3 to 8/3 of `crop`, so the norms see images of many sizes
    (a 32 px tile and a 384 px input upscale alike)."""
    return sorted({max(16, round(crop * k / 48) * 16) for k in (2, 3, 4, 6, 8)})


def upscale_mixed_batch(pool: "Pool", batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`upscale_batch` at one of `upscale_crops(crop)`, drawn per call, with the batch scaled to hold about as many
    pixels as `batch` crops of `crop` px."""
    sizes = upscale_crops(crop)
    size = sizes[int(torch.randint(len(sizes), (1,), device=pool.ids.device, generator=pool.gen))]
    return upscale_batch(pool, max(1, round(batch * (crop / size) ** 2)), size)


def sub_window(height: int, width: int, gen) -> tuple[slice, slice]:
    """A random window of a height x width grid, a quarter to three quarters of each side (a tile of it)."""
    def one(n):
        size = int(torch.randint(max(1, n // 4), max(2, 3 * n // 4 + 1), (1,), generator=gen, device=gen.device))
        start = int(torch.randint(0, n - size + 1, (1,), generator=gen, device=gen.device))
        return slice(start, start + size)
    return one(height), one(width)


def train_upscale_vae(run: Run, deadline, vae, pool, keep_latents=False):
    """Train the x4 VAE on `upscale_batch` crops: L1 + MSE, plus L1 of the 4x box averages (the colours a downscale
    shows), plus a small KL, plus `--consistency` x L1 between the decode of a window of the latents and the same
    window of the whole decode (tiled decoding); then rescale its latents exactly to unit variance under the
    pipeline's fixed 0.08333. `keep_latents` trains the decoder only: the latent space a trained UNet reads stays."""
    dev = device()
    vae.to(dev).train()
    if keep_latents:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt, sched = optimizer(params, run.vae_lr, dev)
    logger = Logger(run, f"vae_{UPSCALER}", params=models.n_params(vae), crop=run.crop, keep_latents=keep_latents)

    def step(i):
        x = upscale_mixed_batch(pool, run.vae_batch, run.crop)[0]
        with autocast(dev):
            with torch.set_grad_enabled(not keep_latents):
                post = vae.encode(x).latent_dist
                z = post.sample()
            rec = vae.decode(z).sample.float()
        err = rec - x
        loss = err.abs().mean() + (err ** 2).mean() + F.avg_pool2d(err, 4).abs().mean()
        if not keep_latents:
            loss = loss + 1e-5 * post.kl().mean() / x[0].numel()
        if run.consistency:
            ys, xs = sub_window(*z.shape[-2:], pool.gen)
            with autocast(dev):
                part = vae.decode(z[..., ys, xs]).sample.float()
            whole = rec[..., 4 * ys.start:4 * ys.stop, 4 * xs.start:4 * xs.stop]
            loss = loss + run.consistency * (part - whole).abs().mean()
        return _optimize(loss, opt, params, sched)

    loop(step, deadline, run, logger, params)
    vae.eval()
    with torch.no_grad():
        z = vae.encode(upscale_batch(pool, 8 if run.smoke else 64, run.crop)[0]).latent_dist.sample()
        x = upscale_batch(pool, 8 if run.smoke else 64, run.crop)[0]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    std = z.std().item()
    if not keep_latents:
        _rescale_latents(vae, 1 / (models.UPSCALE_SCALING * std))
        vae.register_to_config(scaling_factor=models.UPSCALE_SCALING)
    logger.log(logger.data["steps"], logger.data["losses"][-1][1] if logger.data["losses"] else math.nan,
               latent_std=std, recon_mad_255=(rec - x).abs().mean().item() * 127.5)
    vae.half().save_pretrained(run.out / UPSCALER / "vae", safe_serialization=True)


def train_upscaler(run: Run, deadline):
    """Train the x4 upscaler (own 4x VAE, tiny text encoder, 7-channel convolutional UNet with noise-level classes)
    on `upscale_batch` pairs; `--resume` warm-starts every part from the resumed model's weights that still fit, and
    its VAE is fine-tuned for `--vae-share` of the time (0: kept as it is; `--keep-latents`: its decoder only)."""
    from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)

    dev = device()
    torch.manual_seed(run.seed)
    tok = _tokenizer(run, UPSCALER)
    pool = Pool(run.pool // 4, run.seed + 3, tok, dev)
    start = time.time()
    vae_deadline = start + run.vae_share * (deadline - start)
    if run.resume:
        old = run.resume / UPSCALER
        te = models.load_text_and_unet(old)[0]
        unet = models.upscale_unet(te.config.hidden_size, run.smoke)
        models.load_matching(unet, UNet2DConditionModel.from_pretrained(old / "unet", dtype=torch.float32))
        if run.vae_share > 0 and run.keep_latents:
            vae = AutoencoderKL.from_pretrained(old / "vae", dtype=torch.float32)
            train_upscale_vae(run, vae_deadline, vae, pool, keep_latents=True)
        elif run.vae_share > 0:
            vae = models.upscale_vae(run.smoke)
            models.load_matching(vae, AutoencoderKL.from_pretrained(old / "vae", dtype=torch.float32))
            train_upscale_vae(run, vae_deadline, vae, pool)
    else:
        train_upscale_vae(run, start + max(run.vae_share, 0.25) * (deadline - start), models.upscale_vae(run.smoke),
                          pool)
        te = models.text_encoder(len(tok), run.smoke, hidden=64, layers=2)
        unet = models.upscale_unet(te.config.hidden_size, run.smoke)
    vae = _load_vae(run, UPSCALER, dev)
    te.to(dev).eval().requires_grad_(False)  # the convolutional UNet reads no prompt; the pipeline still encodes one
    unet.to(dev).train()
    sched, low_sched = models.noise_scheduler(models.ZERO_SNR_NOISE), DDPMScheduler(**models.LOW_RES_NOISE)
    params = list(unet.parameters())
    opt, lr_sched = optimizer(params, run.lr, dev)
    logger = Logger(run, "upscaler", params_unet=models.n_params(unet), params_text=models.n_params(te),
                    crop=run.crop)
    batch = max(2, run.batch // 4)
    with torch.no_grad():
        states = te(pool.empty)[0]

    def step(i):
        x, low = upscale_mixed_batch(pool, batch, run.crop)
        b = x.shape[0]
        pick = torch.rand(b, device=dev) < 0.5
        level = torch.where(pick, torch.randint(0, UPSCALE_LOW_LEVELS, (b,), device=dev),
                            torch.randint(0, 351, (b,), device=dev))
        low = low_sched.add_noise(low, torch.randn_like(low), level)
        with torch.no_grad(), autocast(dev):
            lat = vae.encode(x).latent_dist.sample().float() * vae.config.scaling_factor
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev)
        with autocast(dev):
            inp = torch.cat([sched.add_noise(lat, noise, t), low], dim=1)
            pred = unet(inp, t, states.expand(b, -1, -1), class_labels=level).sample
        loss = _diffusion_loss(pred, noise, t, sched, lat)
        if run.consistency:  # a tile's prediction should be the whole's there: tiled upscaling, seams and colours
            ys, xs = sub_window(*inp.shape[-2:], pool.gen)
            with autocast(dev):
                part = unet(inp[..., ys, xs], t, states.expand(b, -1, -1), class_labels=level).sample
            loss = loss + run.consistency * ((part.float() - pred.float()[..., ys, xs]) ** 2).mean()
        return _optimize(loss, opt, params, lr_sched)

    loop(step, deadline, run, logger, params)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet.eval(),
                                          low_res_scheduler=low_sched,
                                          scheduler=DPMSolverMultistepScheduler.from_config(models.ZERO_SNR_NOISE),
                                          max_noise_level=350)
    _save(pipe, run.out / UPSCALER)
    (run.out / UPSCALER / "diffcli.json").write_text(json.dumps(UPSCALE_DEFAULTS, indent=1))


UPSCALE_DEFAULTS = {**DEFAULTS, "description": "x4 upscaler for tiny-shapes: any input size (32 px scenes, 128 px "
                    "tiny-shapes outputs)", "steps": 10, "cfg": 1.0, "scheduler": "dpm++2m", "noise_level": 20}


def main(argv=None):
    """Parse arguments and run the stage(s) inside the time budget."""
    ap = argparse.ArgumentParser(prog="python -m lab.train", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget, saving included")
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--stage", choices=["vae", "unet", "upscaler", "all", "decoder"], default="all",
                    help="decoder: fine-tune the decoder of --resume's VAE only")
    ap.add_argument("--smoke", action="store_true", help="tiny networks and batches (tests)")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--pool", type=int, default=100_000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--edge-weight", type=float, default=0.0, help="decoder stage: extra weight of outline pixels")
    ap.add_argument("--schedule", choices=["epsilon", "zero-snr"], default="epsilon",
                    help="base model's noise schedule: SD 1.x with epsilon prediction, or zero terminal SNR with "
                         "v-prediction (resuming an epsilon model converts it)")
    ap.add_argument("--focus", metavar="[SIZE-]SHAPE",
                    help="oversample one shape, of one size (small-star) or of both at their usual odds (star)")
    ap.add_argument("--focus-share", type=float, default=0.5, help="share of scenes given a --focus object")
    ap.add_argument("--relation-head", type=float, default=0.0, metavar="WEIGHT",
                    help="unet stage: add WEIGHT x the loss of a linear head that reads each two-object caption's "
                         "relation from the text encoder's output after the relation word (the head is not saved)")
    ap.add_argument("--focus-one-object", action="store_true",
                    help="give the --focus object to one-object scenes only (--focus-share is then their share); "
                         "two-object scenes keep their usual shapes and sizes")
    ap.add_argument("--distill-below", type=int, default=0, metavar="T",
                    help="unet stage: at timesteps below T, train toward a frozen teacher model's estimate instead of "
                         "the data (keeps what it draws well; with --schedule zero-snr the levels above T learn the "
                         "new schedule)")
    ap.add_argument("--teacher", type=Path, help="--distill-below's teacher, a folder like --resume's (default: "
                                                 "the --resume model)")
    ap.add_argument("--distill-share", type=float, metavar="P",
                    help="with --distill-below T: draw a share P of training timesteps below T (default: uniform, "
                         "T/1000), to spend more steps where the teacher is the target")
    ap.add_argument("--anchor-text", type=float, default=0.0, metavar="WEIGHT",
                    help="unet stage, with --resume: add WEIGHT x the relative squared change of the text encoder's "
                         "output from the resumed one's at every token --relation-head does not train, so a UNet "
                         "trained on the old encoder can share the new one (a refiner)")
    ap.add_argument("--crop", type=int, default=128,
                    help="upscaler stage: output px of the training crops (a multiple of 16; the input is a quarter)")
    ap.add_argument("--vae-share", type=float, default=0.25, metavar="F",
                    help="upscaler stage: share of the time that trains the x4 VAE before the UNet (with --resume, "
                         "0 keeps the resumed VAE)")
    ap.add_argument("--keep-latents", action="store_true",
                    help="upscaler stage with --resume: train the x4 VAE's decoder only, so the resumed UNet's latent "
                         "space stays")
    ap.add_argument("--consistency", type=float, default=0.0, metavar="WEIGHT",
                    help="upscaler stage: add WEIGHT x the disagreement between a random window's prediction (UNet) or "
                         "decode (VAE) and the same window of the whole crop's, so tiled upscaling matches untiled")
    a = ap.parse_args(argv)
    if a.keep_latents and not a.resume:
        ap.error("--keep-latents needs --resume DIR: the model whose latent space it keeps")
    if a.crop % 16 or not 0 <= a.vae_share < 1:
        ap.error(f"--crop must be a multiple of 16 and --vae-share in [0, 1), got {a.crop} and {a.vae_share}")
    if a.anchor_text and not a.resume:
        ap.error("--anchor-text needs --resume DIR: the encoder it anchors to")
    if a.distill_below and not (a.teacher or a.resume):
        ap.error("--distill-below needs a teacher: --teacher DIR or --resume DIR")
    if a.distill_share is not None and not (a.distill_below and 0 <= a.distill_share <= 1):
        ap.error("--distill-share needs --distill-below T and a share between 0 and 1")
    focus = None
    if a.focus:
        size, _, shape = a.focus.rpartition("-")
        if size not in world.SIZES + [""] or shape not in world.SHAPES:
            ap.error(f"--focus {a.focus!r}: expected [SIZE-]SHAPE with SIZE in {world.SIZES}, SHAPE in {world.SHAPES}")
        focus = (world.SIZES.index(size) if size else None, world.SHAPES.index(shape))
    run = Run(a.out, a.seed, a.minutes, a.stage, a.resume, a.smoke, a.max_steps, a.batch, a.lr, a.vae_batch, a.vae_lr,
              pool=a.pool, edge_weight=a.edge_weight, schedule=a.schedule, focus=focus,
              focus_share=a.focus_share if focus else 0.0, focus_one_object=bool(focus) and a.focus_one_object,
              relation_head=a.relation_head, distill_below=a.distill_below, teacher=a.teacher,
              distill_share=a.distill_share, anchor_text=a.anchor_text, crop=a.crop, vae_share=a.vae_share,
              keep_latents=a.keep_latents, consistency=a.consistency)
    if run.smoke:
        run.batch, run.vae_batch, run.pool, run.crop = 4, 2, 64, 32
    run.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    end = start + 60 * run.minutes - (5 if run.smoke else 25)  # leave time to save
    if run.stage in ("vae", "all"):
        train_vae(run, start + (end - start) * (0.2 if run.stage == "all" else 1))
    if run.stage == "decoder":
        train_vae(run, end, decoder_only=True)
    if run.stage in ("unet", "all"):
        train_unet(run, time.time() + (end - time.time()) * (0.75 if run.stage == "all" else 1))
    if run.stage in ("upscaler", "all"):
        train_upscaler(run, end)


if __name__ == "__main__":
    main()
