"""Train tiny-shapes-control, the bundled model's canny ControlNet: `python -m lab.train_control --out DIR --minutes M`.

A ControlNet (Zhang et al. 2023) without attention (DownBlock2D and a plain mid block, 1.8 M parameters, its
ResNets copied from the base UNet, zero convolutions) reads diffcli's own `canny` map of a rendered scene and feeds
the frozen bundled pair: above timestep 500 the base UNet, below it the refiner's UNet at the matching noise level,
as `diffcli txt2img` hands over at --refiner-start 0.5. A share of the maps are the canny of an outline drawing of
the scene (dark lines on a light ground), so a drawn outline works as well as a rendered or generated image.
"""

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffcli import control
from diffcli.refiner import _converted_unet, alphas_cumprod, matched_timesteps
from diffcli.shapes import world
from lab import models
from lab.train import Logger, Run, _data_target, _diffusion_loss, _optimize, loop, optimizer

BUNDLED = Path(__file__).resolve().parents[1] / "diffcli" / "bundled"
HANDOVER = 500  # timesteps below this go to the refiner (tiny-shapes' refiner_start 0.5)
OUTLINE_SHARE = 0.25  # maps made from an outline drawing rather than the filled scene
UNSAID = ("shape0", "shape1", "size0", "size1", "position", "relation")  # --unsaid-share: what only the map then gives


def misnamed(rng: random.Random, scene):
    """A copy of `scene` whose objects have other shapes: its caption names shapes the map does not show
    (--conflict-share: the map's shape must win over the prompt's, as a canny map's edges do)."""
    other = copy.deepcopy(scene)
    for o in other.objects:
        o.shape = rng.choice([k for k in range(len(world.SHAPES)) if k != o.shape])
    return other


def controlnet(unet):
    """An attention-free ControlNet shaped like `unet`'s down path, its ResNets and time embedding copied from it."""
    from diffusers import ControlNetModel

    net = ControlNetModel(in_channels=unet.config.in_channels, down_block_types=("DownBlock2D",) * 3,
                          mid_block_type="UNetMidBlock2D", block_out_channels=unet.config.block_out_channels,
                          layers_per_block=unet.config.layers_per_block, attention_head_dim=6,
                          cross_attention_dim=unet.config.cross_attention_dim, norm_num_groups=unet.config.norm_num_groups,
                          conditioning_embedding_out_channels=(16, 32, 64, 128))
    models.load_matching(net, unet)
    # The zero convolutions alone keep the untrained net a no-op; a zero last layer of the map's encoder too (as
    # diffusers builds it) starves it of gradient until they have grown: on the CPU budget it learned nothing in 500
    # steps (NOTEBOOK.md), so that layer starts from a small random init.
    torch.nn.init.normal_(net.controlnet_cond_embedding.conv_out.weight, std=0.02)
    return net


def outline_drawing(t: dict, rng: random.Random) -> torch.Tensor:
    """The scenes' objects as outlines (2-4 px dark lines, anti-aliased) on a light ground, (N, 3, 128, 128) in [0, 1]."""
    n, size = t["background"].shape[0], world.SIZE
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = grid[None, :, None], grid[None, None, :]
    img = torch.ones(n, 3, size, size) * torch.tensor([rng.uniform(0.8, 1.0) for _ in range(n)])[:, None, None, None]
    for k in range(2):
        r = torch.tensor(world.RADIUS)[t["size"][:, k]][:, None, None].expand(-1, size, size)
        d = world.shape_sdf(t["shape"][:, k][:, None, None].expand(-1, size, size), xx - t["x"][:, k, None, None],
                            yy - t["y"][:, k, None, None], r)
        width = torch.tensor([rng.uniform(2, 4) for _ in range(n)])[:, None, None]
        alpha = ((width / 2 + 0.5 - d.abs()).clamp(0, 1) * t["present"][:, k, None, None])[:, None]
        img = img * (1 - alpha)
    return img


def canny_maps(images: torch.Tensor) -> torch.Tensor:
    """diffcli's `canny` (the --control preprocessor, default thresholds) of each image: (N, 128, 128) bool."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return torch.from_numpy(np.stack([np.asarray(control.canny(Image.fromarray(a)))[..., 0] > 127 for a in arrays]))


def rollout(net, unet, refined, sampler, text, pool, idx, below, steps, cfg, gen, chunk=100):
    """The states the sampler passes through below timestep `below` when `diffcli txt2img` draws pool scenes `idx`
    from their student captions (colours and background only) and maps: `sampler` (the model's euler-a) over `steps`
    steps, guidance `cfg`, the base UNet above HANDOVER and `refined` (the refiner standing in for it,
    diffcli.refiner) below, `net`'s residuals on both halves. Returns (scene index, state as the UNets read it,
    timestep) per visit, and the final latents of `idx`. Where a map-only image goes wrong (a small square's rounded
    corners, settled by the refiner in the last steps) these states are off the path of noised data, so training on
    noised data alone never meets them."""
    empty = text(pool.empty)[0]
    scenes, states, times, finals = [], [], [], []
    for i in range(0, len(idx), chunk):
        part = idx[i:i + chunk]
        n = len(part)
        sampler.set_timesteps(steps)
        said = torch.cat([empty.expand(n, -1, -1), text(pool.student_ids[part])[0]])
        cond = pool.maps[part].float()[:, None].expand(-1, 3, -1, -1).repeat(2, 1, 1, 1)
        x = torch.randn(n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                        generator=gen) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            model_in = sampler.scale_model_input(torch.cat([x, x]), t)
            if t < below:
                scenes.append(part)
                states.append(model_in[n:].clone())
                times.append(torch.full((n,), int(round(float(t)))))
            down, mid = net(model_in, t, said, cond, return_dict=False)
            model = refined if t < HANDOVER else unet
            pred = model(model_in, t, encoder_hidden_states=said, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)[0]
            uncond, texted = pred.chunk(2)
            x = sampler.step(uncond + cfg * (texted - uncond), t, x, generator=gen).prev_sample
        finals.append(x)
    return torch.cat(scenes), torch.cat(states), torch.cat(times), torch.cat(finals)


def bank_scenes(order: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The scenes of the k-th rollout bank: the k-th run of `n` along `order`, wrapping round it."""
    return order[torch.arange(k * n, (k + 1) * n) % len(order)]


class Pool:
    """Scenes drawn once: frozen-VAE latent moments, canny maps, caption token ids."""

    def __init__(self, n, seed, tokenizer, vae, unsaid_share=0.0, conflict_share=0.0, small_share=None, focus=(),
                 focus_share=0.0, distill=False):
        rng = random.Random(seed)
        scenes = [world.sample_scene(rng, rng.random() < 0.5) for _ in range(n)]
        if small_share is not None:  # --small-share: small objects, whose shapes the map conveys worst, drawn more often
            for s in scenes:
                for o in s.objects:
                    o.size = 0 if rng.random() < small_share else 1
        if focus:  # --focus: the (size, shape) kinds the map conveys worst, given to one object of a share of scenes
            for s in scenes:
                if rng.random() < focus_share:
                    o = rng.choice(s.objects)
                    o.size, o.shape = rng.choice(focus)
        # train=True: held-out captions never said in full; a share say no shape, size or place (the map's to give),
        # a share name other shapes than the scene's (the map's to override)
        captions = []
        for s in scenes:
            draw = rng.random() if unsaid_share or conflict_share else 1.0  # no draw: the first runs' pools
            if draw < unsaid_share:
                captions.append(world.caption(rng, s, drop=UNSAID))
            elif draw < unsaid_share + conflict_share:
                captions.append(world.caption(rng, misnamed(rng, s)))
            else:
                captions.append(world.caption(rng, s))
        self.ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        self.empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        if distill:  # --distill-share: each scene also captioned with everything but shape, size and place (the
            # student's), and with everything but what the held-out split keeps back (the teacher's)
            ids = lambda texts: tokenizer(texts, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                                          return_tensors="pt").input_ids
            self.student_ids = ids([world.caption(rng, s, full=True, drop=UNSAID) for s in scenes])
            self.teacher_ids = ids([world.caption(rng, s, full=True) for s in scenes])
        moments, maps = [], []
        for i in range(0, n, 64):
            t = world.to_tensors(scenes[i:i + 64])
            images = world.render(t)
            with torch.no_grad():
                moments.append(vae.encode(images * 2 - 1).latent_dist.parameters)
            outline = torch.tensor([rng.random() < OUTLINE_SHARE for _ in range(len(images))])
            maps.append(canny_maps(torch.where(outline[:, None, None, None], outline_drawing(t, rng), images)))
        self.scenes, self.moments, self.maps, self.n = scenes, torch.cat(moments), torch.cat(maps), n
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, b, dropout, distill_share=0.0, bank=None, rollout_share=0.0):
        """Latents (sampled from their moments), maps (N, 3, 128, 128) in [0, 1], caption ids (`dropout` emptied),
        where each map has edges, dilated at the latent's resolution (N, 1, h, w) for --object-weight, which scenes
        (a `distill_share`, never emptied) are taught by the teacher instead: their ids are the student's caption,
        and their teacher's caption ids follow; then which rows (a `rollout_share`, taught too) are sampler states
        from `bank` (rollout's scene index, state, timestep), with their states and timesteps."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        idx = torch.randint(0, self.n, (b,), generator=self.gen)
        fixed, states, times = torch.zeros(b, dtype=torch.bool), None, None
        if rollout_share:
            fixed = torch.rand(b, generator=self.gen) < rollout_share
            visit = torch.randint(0, len(bank[0]), (int(fixed.sum()),), generator=self.gen)
            idx[fixed], states, times = bank[0][visit], bank[1][visit], bank[2][visit]
        drop = (torch.rand(b, generator=self.gen) < dropout)[:, None]
        latents = DiagonalGaussianDistribution(self.moments[idx]).sample(self.gen)
        maps = self.maps[idx].float()[:, None]
        near = torch.nn.functional.max_pool2d(maps, maps.shape[-1] // latents.shape[-1])
        near = torch.nn.functional.max_pool2d(near, 3, stride=1, padding=1)
        ids, teacher = torch.where(drop, self.empty, self.ids[idx]), self.ids[:0]
        # no draw without distillation: the earlier runs' batches stay as they were
        taught = torch.rand(b, generator=self.gen) < distill_share if distill_share else torch.zeros(b, dtype=torch.bool)
        taught = taught | fixed
        if taught.any():
            ids[taught], teacher = self.student_ids[idx[taught]], self.teacher_ids[idx[taught]]
        return latents, maps.expand(-1, 3, -1, -1), ids, near, taught, teacher, fixed, states, times


def train(run: Run, base: Path, refiner: Path | None, pool_size: int, unsaid_share: float = 0.0,
          object_weight: float = 0.0, conflict_share: float = 0.0, small_share: float | None = None,
          lr_decay: bool = False, focus: tuple = (), focus_share: float = 0.0, distill_share: float = 0.0,
          rollout_share: float = 0.0, rollout_scenes: int = 1000, rollout_below: int = 250,
          teacher_dir: Path | None = None, rollout_refresh: float = 0.0) -> Path:
    """Train (from `run.resume`, a ControlNet folder, if given) and save `run.out/tiny-shapes-control` (fp16
    safetensors); returns that folder. `object_weight`: the loss counts 1 + this much near the map's edges (the
    object, a few percent of the latent, where its shape is decided). `lr_decay`: the learning rate falls along a
    cosine to 0 at the end of the time box (the earlier runs kept it constant). `focus`: (size, shape) index pairs,
    one of which a share `focus_share` of the scenes gets for one of its objects. `distill_share`: a share of each
    batch is captioned without shape, size or place and trained to predict what the frozen teacher (`teacher_dir`'s
    ControlNet, default the starting one) and UNet predict from the full caption: the map must then carry what the
    words would have said. `rollout_share`: a share of each batch is, instead of noised data, a state the sampler
    visits below timestep `rollout_below` when the starting ControlNet draws one of `rollout_scenes` pool scenes
    (those with a `focus` kind first) from colours and background only (`rollout`), taught the same way; every
    `rollout_refresh` minutes (0: never) the student, as it is then, draws the next `rollout_scenes` for a new bank."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(run.seed)
    t0 = time.time()
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    frozen = lambda cls, path: cls.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)  # noqa: E731
    text, vae = frozen(CLIPTextModel, base / "text_encoder"), frozen(AutoencoderKL, base / "vae")
    unet, own = frozen(UNet2DConditionModel, base / "unet"), frozen(UNet2DConditionModel, refiner / "unet") if refiner else None
    sched = models.noise_scheduler(models.saved_schedule(base))
    own_sched = models.noise_scheduler(models.saved_schedule(refiner)) if refiner else None
    # the refiner's own timestep at each of the base's (nearest alphas_cumprod), as the --refiner handover calls it
    own_t = matched_timesteps(alphas_cumprod(dict(sched.config)), alphas_cumprod(dict(own_sched.config))) if refiner else None
    net = (ControlNetModel.from_pretrained(run.resume, torch_dtype=torch.float32) if run.resume else controlnet(unet)).train()
    # the teacher: --teacher's ControlNet, or a copy of the starting weights
    teacher = None
    if distill_share or rollout_share:
        teacher = frozen(ControlNetModel, teacher_dir) if teacher_dir else copy.deepcopy(net).eval().requires_grad_(False)
    pool = Pool(pool_size, run.seed + 3, tok, vae, unsaid_share, conflict_share, small_share, focus, focus_share,
                distill=bool(distill_share or rollout_share))
    print(f"pool of {pool_size} scenes in {(time.time() - t0) / 60:.1f} min", flush=True)
    bank = None
    if rollout_share:
        from diffusers import EulerAncestralDiscreteScheduler

        read = lambda path: json.loads(path.read_text())  # noqa: E731
        sampler = EulerAncestralDiscreteScheduler.from_config(read(base / "scheduler" / "scheduler_config.json"))
        refined = unet
        if refiner:
            refined = _converted_unet(own, read(refiner / "scheduler" / "scheduler_config.json"), sampler, unet.config, None)
        defaults = read(base / "diffcli.json")  # the steps and guidance diffcli txt2img draws with
        chosen = torch.tensor(sorted(range(pool_size),
                                     key=lambda i: not any((o.size, o.shape) in focus for o in pool.scenes[i].objects)))
        roll_gen = torch.Generator().manual_seed(run.seed)

        def draw_bank(k):
            """The student's states now (where its own sampling goes) on the k-th `rollout_scenes` of `chosen`,
            focus kinds first, wrapping round the pool."""
            idx = bank_scenes(chosen, k, rollout_scenes)
            was = net.training
            net.eval()
            with torch.no_grad():
                states = rollout(net, unet, refined, sampler, text, pool, idx, rollout_below, defaults["steps"],
                                 defaults["cfg"], roll_gen)[:3]
            net.train(was)
            print(f"{len(states[0])} sampler states (bank {k}) at {(time.time() - t0) / 60:.1f} min", flush=True)
            return states

        bank = draw_bank(0)
    params = list(net.parameters())
    opt, lr_sched = optimizer(params, run.lr, torch.device("cpu"))
    if lr_decay:
        start, end = time.time(), run_deadline(run, t0)
        cosine = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - start) / (end - start))))  # noqa: E731
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    logger = Logger(run, "control", params_controlnet=models.n_params(net), batch=run.batch, pool=pool_size,
                    base=str(base), refiner=str(refiner), unsaid_share=unsaid_share, object_weight=object_weight,
                    conflict_share=conflict_share, small_share=small_share, lr_decay=lr_decay,
                    focus=[f"{world.SIZES[a]}-{world.SHAPES[b]}" for a, b in focus], focus_share=focus_share,
                    distill_share=distill_share, rollout_share=rollout_share, rollout_scenes=rollout_scenes,
                    rollout_below=rollout_below, rollout_refresh=rollout_refresh, rollout_states=len(bank[0]) if bank else 0,
                    teacher=str(teacher_dir or run.resume) if teacher is not None else None)
    sf = vae.config.scaling_factor

    bank_number, bank_drawn = 0, time.time()

    def step(i):
        nonlocal bank, bank_number, bank_drawn
        if rollout_share and rollout_refresh and time.time() - bank_drawn > rollout_refresh * 60:
            bank_number += 1
            bank, bank_drawn = draw_bank(bank_number), time.time()
        lat, cond, ids, near, taught, teacher_ids, fixed, states_at, times = pool.batch(
            run.batch, run.caption_dropout, distill_share, bank, rollout_share)
        weights = 1 + object_weight * near if object_weight else torch.ones_like(near)
        lat = lat * sf
        eps = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],))
        noisy = sched.add_noise(lat, eps, t)
        if fixed.any():  # the sampler's own states, where noised data never goes
            noisy[fixed], t[fixed] = states_at, times
        with torch.no_grad():
            states = text(ids)[0]
            if taught.any():  # the teacher's residuals from the full caption, for the taught scenes
                said = text(teacher_ids)[0]
                said_down, said_mid = teacher(noisy[taught], t[taught], said, cond[taught], return_dict=False)
        down, mid = net(noisy, t, states, cond, return_dict=False)
        low = t < HANDOVER if refiner else torch.zeros_like(t, dtype=torch.bool)
        loss = 0.0
        for part, model, steps, schedule in ((~low, unet, t, sched), (low, own, own_t[t] if refiner else t, own_sched)):
            if not part.any():
                continue
            pred = model(noisy[part], steps[part], states[part], down_block_additional_residuals=[d[part] for d in down],
                         mid_block_additional_residual=mid[part]).sample
            target = None
            if taught[part].any():  # the teacher's prediction replaces the data's target for its scenes
                among = part[taught]
                with torch.no_grad():
                    target = _data_target(schedule, lat[part], eps[part], steps[part])  # a copy: eps[part] indexes
                    target[taught[part]] = model(noisy[part & taught], steps[part & taught], said[among],
                                                 down_block_additional_residuals=[d[among] for d in said_down],
                                                 mid_block_additional_residual=said_mid[among]).sample
            loss = loss + _diffusion_loss(pred, eps[part], steps[part], schedule, lat[part], weights[part],
                                          target) * part.float().mean()
        return _optimize(loss, opt, params, lr_sched)

    loop(step, run_deadline(run, t0), run, logger, params)
    folder = run.out / "tiny-shapes-control"
    net.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    logger.data["total_minutes"] = round((time.time() - t0) / 60, 2)
    logger.path.write_text(json.dumps(logger.data, indent=1))
    return folder


def kinds(parser, flag: str, names) -> list[tuple[int, int]]:
    """(size, shape) index pairs of SIZE-SHAPE `names` ("small-square"); one unknown is `parser`'s exit 2."""
    pairs = []
    for kind in names:
        size, _, shape = kind.partition("-")
        if size not in world.SIZES or shape not in world.SHAPES:
            parser.error(f"{flag} {kind!r}: expected SIZE-SHAPE with SIZE in {world.SIZES}, SHAPE in {world.SHAPES}")
        pairs.append((world.SIZES.index(size), world.SHAPES.index(shape)))
    return pairs


def run_deadline(run: Run, t0: float) -> float:
    """The end of the time box, counted from the start (pool drawing included)."""
    return t0 + run.minutes * 60


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=30.0, help="time box, pool drawing included")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=3000, help="scenes drawn, encoded and mapped once")
    p.add_argument("--base", type=Path, default=BUNDLED / "tiny-shapes")
    p.add_argument("--refiner", default=str(BUNDLED / "tiny-shapes-refiner"), help="'none': the base at every step")
    p.add_argument("--resume", type=Path, default=None, help="a ControlNet folder to continue")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unsaid-share", type=float, default=0.0, help="captions saying no shape, size or place")
    p.add_argument("--conflict-share", type=float, default=0.0, help="captions naming other shapes than the map's")
    p.add_argument("--object-weight", type=float, default=0.0, help="extra loss weight near the map's edges")
    p.add_argument("--small-share", type=float, default=None, help="share of small objects (default: half)")
    p.add_argument("--lr-decay", action="store_true", help="cosine learning-rate decay to 0 over the time box")
    p.add_argument("--focus", default="", metavar="SIZE-SHAPE,...",
                   help="kinds given to one object of a --focus-share of the scenes, e.g. small-square,small-star")
    p.add_argument("--focus-share", type=float, default=0.3)
    p.add_argument("--distill-share", type=float, default=0.0,
                   help="share of each batch captioned without shape, size or place and taught by --teacher")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the ControlNet folder that teaches --distill-share and --rollout-share (default: --resume)")
    p.add_argument("--rollout-share", type=float, default=0.0,
                   help="share of each batch that is the sampler's own states (below --rollout-below), taught by --teacher")
    p.add_argument("--rollout-scenes", type=int, default=1000, help="pool scenes the sampler draws for those states")
    p.add_argument("--rollout-below", type=int, default=250, help="timestep under which the sampler's states are kept")
    p.add_argument("--rollout-refresh", type=float, default=0.0,
                   help="minutes after which the student draws a new bank of states from the next scenes (0: never)")
    a = p.parse_args(argv)
    if (a.distill_share or a.rollout_share) and not a.resume:
        p.error("--distill-share and --rollout-share need --resume: the ControlNet that teaches")
    for flag, share in (("--distill-share", a.distill_share), ("--rollout-share", a.rollout_share)):
        if not 0 <= share <= 1:
            p.error(f"{flag} {share:g}: expected a share from 0 to 1")
    if a.rollout_share and not 1 <= a.rollout_scenes <= a.pool:
        p.error(f"--rollout-scenes {a.rollout_scenes}: expected 1 to --pool ({a.pool})")
    if a.rollout_refresh < 0 or (a.rollout_refresh and not a.rollout_share):
        p.error(f"--rollout-refresh {a.rollout_refresh:g}: expected minutes > 0, with --rollout-share")
    if not 0 < a.rollout_below <= 1000:
        p.error(f"--rollout-below {a.rollout_below}: expected a timestep from 1 to 1000")
    for flag, folder in (("--resume", a.resume), ("--teacher", a.teacher)):
        if folder is not None and not (folder / "config.json").is_file():
            p.error(f"{flag} {folder}: not a ControlNet folder (no config.json)")
    focus = kinds(p, "--focus", filter(None, a.focus.split(",")))
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    run = Run(out=a.out, seed=a.seed, minutes=a.minutes, max_steps=a.max_steps, batch=a.batch, lr=a.lr,
              resume=a.resume)
    folder = train(run, a.base, None if a.refiner == "none" else Path(a.refiner), a.pool, a.unsaid_share,
                   a.object_weight, a.conflict_share, a.small_share, a.lr_decay, tuple(focus), a.focus_share,
                   a.distill_share, a.rollout_share, a.rollout_scenes, a.rollout_below, a.teacher,
                   a.rollout_refresh)
    print(folder)


if __name__ == "__main__":
    main()
