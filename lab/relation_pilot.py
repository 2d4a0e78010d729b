"""Can the caption decide a two-object layout from pure noise? A CPU pilot (lab/NOTEBOOK.md, "What limits
accuracy"). Trains the bundled text encoder and UNet on one thing only: the x0 estimate at t=999 from pure noise
(as a zero-terminal-SNR v-prediction model makes it, x0 = -output), on 6000 fully captioned two-object training
scenes, with or without the relation head of `python -m lab.train --relation-head`. Every 100 steps it
prints, for 64 held-out captions, how often the estimate (4x4-pooled, mean over 4 noise draws) is closer to the
caption's layout than to the same pair swapped, the two errors, and the head's accuracy. Nothing is saved.

`python -m lab.relation_pilot --minutes 12 --relation-head 1.0 [--lr 5e-4 --seed 1]`
"""

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from diffcli.shapes import world
from lab.plain import load
from lab import train


def scenes(rng, n, heldout):
    """n two-object scenes with full captions (sizes unsaid), from the held-out tuples or from the others."""
    out = []
    while len(out) < n:
        s = world.sample_scene(rng, True)
        a, b = s.objects
        if world.heldout((a.colour, a.shape, s.relation, b.colour, b.shape, s.background)) == heldout:
            out.append((world.caption(rng, s, full=True, train=False, drop=("size0", "size1")), s))
    return out


def swapped(s):
    """The scene with its two objects' places exchanged."""
    a, b = s.objects
    return world.Scene(s.background, [world.Obj(a.shape, a.colour, a.size, b.x, b.y),
                                      world.Obj(b.shape, b.colour, b.size, a.x, a.y)], relation=s.relation)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="diffcli/bundled/tiny-shapes")
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--relation-head", type=float, default=0.0, help="weight of the relation head's loss")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    pipe = load(a.model)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder.train(), pipe.unet.train(), pipe.vae
    head = torch.nn.Linear(te.config.hidden_size, len(world.RELATIONS))

    def encode(batch):
        with torch.no_grad():
            return torch.cat([vae.encode(world.render(world.to_tensors(batch[i:i + 200])) * 2 - 1).latent_dist.mean
                              for i in range(0, len(batch), 200)]) * vae.config.scaling_factor

    def ids(captions):
        return tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids

    pool = scenes(random.Random(a.seed), 6000, heldout=False)
    pool_ids, pool_latents = ids([t for t, _ in pool]), encode([s for _, s in pool])
    marks = train.relation_marks(pool_ids, tok, [s for _, s in pool])
    probe = scenes(random.Random(999), 64, heldout=True)
    probe_ids = ids([t for t, _ in probe])
    right, wrong = encode([s for _, s in probe]), encode([swapped(s) for _, s in probe])

    def measure():
        unet.eval(), te.eval()
        with torch.no_grad():
            states = te(probe_ids)[0]
            errors = []
            for k in range(4):
                x0 = -unet(torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(k)),
                           torch.full((64,), 999), states).sample
                errors.append(torch.stack([((F.avg_pool2d(x0, 4) - F.avg_pool2d(z, 4)) ** 2).mean((1, 2, 3))
                                           for z in (right, wrong)]))
            e = torch.stack(errors).mean(0)
            m = marks[:512]
            head_acc = (head(te(pool_ids[:512])[0][m > 0]).argmax(-1) == m[m > 0] - 1).float().mean().item()
        unet.train(), te.train()
        return {"closer_right": (e[0] < e[1]).float().mean().item(), "err_right": round(e[0].mean().item(), 4),
                "err_swapped": round(e[1].mean().item(), 4), "head_acc": round(head_acc, 3)}

    params = list(te.parameters()) + list(unet.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    print("step 0", json.dumps(measure()), flush=True)
    t0, step, gen = time.time(), 0, torch.Generator().manual_seed(a.seed)
    while time.time() - t0 < a.minutes * 60:
        idx = torch.randint(0, len(pool), (32,), generator=gen)
        states = te(pool_ids[idx])[0]
        x0 = -unet(torch.randn(32, 4, 16, 16, generator=gen), torch.full((32,), 999), states).sample
        loss = F.mse_loss(x0, pool_latents[idx]) + a.relation_head * train._relation_loss(head, states, marks[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} ({(time.time() - t0) / 60:.1f} min)", json.dumps(measure()), flush=True)


if __name__ == "__main__":
    main()
