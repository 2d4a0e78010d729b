"""Tiled upscaling in lockstep (MultiDiffusion, Bar-Tal et al. 2023): one pipeline call draws the untiled call's
noise; at each step its UNet runs on overlapping latent windows whose predictions are blended, and its VAE decodes in
overlapping tiles. Group norms in windows use the whole image's statistics, read on a pass over the image whole, or
on a strided subsample of it when it is larger than the default tiles' statistics pass sees (a window's own
statistics shift its colours about as much as another seed)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

SHAPE = 3  # blend weight (1 - |2c - 1|) ** SHAPE, c in (0, 1) across a window: a window's border, where its
# convolutions see zero padding instead of the neighbours, counts little (3 measured better than 1)
STATS_SPAN = 2  # the statistics pass sees the image subsampled to at most this many windows per side (of the default
# tile size, or --tile when larger: a smaller --tile costs no coarser statistics, and its memory stays the default's)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: `tile` wide, at least `overlap` shared with the neighbour."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return sorted(set(list(range(0, length - tile, step)) + [length - tile]))


def _weights(size: int, lead: bool, trail: bool):
    """Blend weights along one axis of a window: peaked at its centre, flat (1) toward a side without a neighbour."""
    import torch

    centre = (torch.arange(size) + 0.5) / size
    weights = (1 - (2 * centre - 1).abs()).clamp(min=1e-3) ** SHAPE
    half = size // 2
    if not lead:
        weights[:half] = 1
    if not trail:
        weights[size - half:] = 1
    return weights


def blend(sample, window: int, overlap: int, one):
    """`one(crop) -> output` on overlapping windows of `sample` (N, C, H, W), blended; the output may be larger
    than its crop by an integer factor (the VAE decoder's)."""
    import torch

    height, width = sample.shape[-2:]
    ys, xs = tile_starts(height, window, overlap), tile_starts(width, window, overlap)
    total = weight = None
    for y in ys:
        for x in xs:
            h, w = min(window, height - y), min(window, width - x)
            out = one(sample[..., y:y + h, x:x + w])
            k = out.shape[-1] // w
            if total is None:  # float32: a window's edge weight may be below float16's range
                total = out.new_zeros(out.shape[:2] + (height * k, width * k), dtype=torch.float32)
                weight = out.new_zeros((height * k, width * k), dtype=torch.float32)
            mask = _weights(h * k, y > ys[0], y < ys[-1])[:, None] * _weights(w * k, x > xs[0], x < xs[-1])[None]
            mask = mask.to(out.device)
            total[..., y * k:(y + h) * k, x * k:(x + w) * k] += out.float() * mask
            weight[y * k:(y + h) * k, x * k:(x + w) * k] += mask
    return (total / weight).to(out.dtype)


class SharedNorms:
    """A model's GroupNorm layers, switchable to record their statistics on one pass (the whole image, subsampled)
    and normalise later passes (windows) with them, call by call in the same order."""

    def __init__(self, model):
        import torch

        self.norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.mode, self.stats, self.queue = None, [], []

    def __enter__(self):
        self.before = [vars(norm).get("forward") for norm in self.norms]  # e.g. offload hooks, put back on exit
        for norm in self.norms:
            norm.forward = lambda x, norm=norm, plain=norm.forward: self._forward(norm, plain, x)
        return self

    def __exit__(self, *exc):
        for norm, forward in zip(self.norms, self.before):
            if forward is None:
                vars(norm).pop("forward", None)
            else:
                norm.forward = forward

    def _forward(self, norm, plain, x):
        if self.mode is None:
            return plain(x)
        grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
        if self.mode == "record":
            stats = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
            self.stats.append(stats)
        else:
            stats = self.queue.pop(0)
        out = ((grouped - stats[0]) / (stats[1] + norm.eps).sqrt()).reshape(x.shape).to(x.dtype)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return out

    def record(self, run, sample, window: int):
        """Run `run` on `sample` subsampled to at most STATS_SPAN windows per side, keeping its norms' statistics."""
        step = -(-max(sample.shape[-2:]) // (STATS_SPAN * window))
        self.mode, self.stats = "record", []
        try:
            run(sample[..., step // 2::step, step // 2::step])
        finally:
            self.mode = None

    def apply(self, run, crop):
        """Run `run` on a window with the recorded statistics."""
        self.mode, self.queue = "apply", list(self.stats)
        try:
            return run(crop)
        finally:
            self.mode = None


def _windowed(forward, norms: SharedNorms, window: int, overlap: int, output, stats_window: int = 0):
    """`forward(sample, ...)` on overlapping windows when the sample is larger than one, with the statistics of a pass
    over at most STATS_SPAN x max(window, stats_window) per side; `output(tensor, like)` wraps the blended tensor as
    `forward` returns its result."""

    def tiled(sample, *args, **kwargs):
        if max(sample.shape[-2:]) <= window:
            return forward(sample, *args, **kwargs)
        like = {}

        def run(crop):
            like["out"] = forward(crop, *args, **kwargs)
            return like["out"][0] if isinstance(like["out"], tuple) else like["out"].sample

        norms.record(run, sample, max(window, stats_window))
        blended = blend(sample, window, overlap, lambda crop: norms.apply(run, crop))
        return output(blended, like["out"])

    return tiled


def _as(tensor, like):
    """`tensor` in the result type of the call it replaces (a tuple or a dataclass with `.sample`)."""
    return (tensor,) if isinstance(like, tuple) else type(like)(sample=tensor)


@contextmanager
def lockstep(pipe, size: tuple[int, int], tile: int, overlap: int, stats_tile: int = 0):
    """During the block, `pipe`'s UNet and VAE decoder work in windows of `tile` input pixels (`overlap` shared) on
    an image of `size`, their group norms with the statistics of a pass over at most STATS_SPAN x max(tile,
    stats_tile) input pixels per side; the latent's scale to the input is read from the first UNet call."""
    scale = {}

    def unet_forward(sample, *args, **kwargs):
        scale.setdefault("latent", sample.shape[-1] / size[0])
        window, shared = max(8, round(tile * scale["latent"])), max(0, round(overlap * scale["latent"]))
        return _windowed(unet_plain, unet_norms, window, shared, _as, round(stats_tile * scale["latent"]))(
            sample, *args, **kwargs)

    def vae_decode(latents, *args, **kwargs):
        ratio = scale.get("latent", latents.shape[-1] / size[0])
        window, shared = max(8, round(tile * ratio)), max(0, round(overlap * ratio))
        tiling = getattr(pipe.vae, "use_tiling", False)  # --low-vram's: it would split the statistics pass
        pipe.vae.use_tiling = tiling and max(latents.shape[-2:]) <= window
        try:
            return _windowed(decode_plain, vae_norms, window, shared, _as, round(stats_tile * ratio))(
                latents, *args, **kwargs)
        finally:
            pipe.vae.use_tiling = tiling

    unet_plain, decode_plain = pipe.unet.forward, pipe.vae.decode
    before = [(module, name, vars(module).get(name)) for module, name in ((pipe.unet, "forward"), (pipe.vae, "decode"))]
    with ExitStack() as stack:
        unet_norms = stack.enter_context(SharedNorms(pipe.unet))
        vae_norms = stack.enter_context(SharedNorms(pipe.vae.decoder))
        pipe.unet.forward, pipe.vae.decode = unet_forward, vae_decode
        try:
            yield
        finally:  # put back exactly what was there (e.g. accelerate's offload hooks)
            for module, name, attribute in before:
                if attribute is None:
                    vars(module).pop(name, None)
                else:
                    setattr(module, name, attribute)


def upscale_with_tiles(pipe, image, seed: int, tile: int, overlap: int, scale: int, call):
    """`image` (PIL) upscaled in lockstep tiles by `call(extra_kwargs, generator) -> HxWx3` (hires.py's x4 pass, at
    the default tile size); `scale` is kept for its callers: the windows read it from the latents."""
    import torch

    with lockstep(pipe, image.size, tile, overlap, tile):
        return call({"image": image}, torch.Generator("cpu").manual_seed(seed))
