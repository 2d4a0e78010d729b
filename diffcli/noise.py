"""Initial noise for variation seeds: slerp between the seed's noise and the variation seed's (A1111 subseeds)."""

from __future__ import annotations


def slerp(t: float, low, high):
    """Spherical interpolation of two noise tensors, per image (A1111 processing.slerp)."""
    import torch

    flat_low, flat_high = low.reshape(low.shape[0], -1), high.reshape(high.shape[0], -1)
    dot = (flat_low / flat_low.norm(dim=1, keepdim=True) * flat_high / flat_high.norm(dim=1, keepdim=True)).sum(1)
    if bool((dot.abs() > 0.9995).all()):  # nearly parallel: plain lerp is exact enough
        return low * (1 - t) + high * t
    omega = torch.acos(dot.clamp(-1, 1))
    so = torch.sin(omega)
    scale_low = (torch.sin((1 - t) * omega) / so).reshape(-1, *[1] * (low.dim() - 1))
    scale_high = (torch.sin(t * omega) / so).reshape(-1, *[1] * (low.dim() - 1))
    return scale_low * low + scale_high * high


def variation_latents(pipe, generators, variation_seeds: list[int], strength: float, width: int, height: int, dtype):
    """Initial latents for a batch: each image's seed noise slerped toward its variation seed's noise.

    The seed noise is drawn from the same CPU generators the pipeline gets next, exactly as diffusers'
    randn_tensor draws it, so ancestral samplers continue from the same generator state.
    """
    import torch

    scale = getattr(pipe, "vae_scale_factor", 8)
    shape = (1, pipe.vae.config.latent_channels, height // scale, width // scale)
    base = torch.cat([torch.randn(shape, generator=g, device="cpu", dtype=dtype) for g in generators])
    other = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), device="cpu", dtype=dtype) for s in variation_seeds])
    if strength == 0:
        return base
    return slerp(float(strength), base.float(), other.float()).to(dtype)


def check_variation(sampling) -> None:
    """--variation-seed and --variation-strength (jobs.Sampling) come together, the strength in [0, 1]."""
    from diffcli.errors import UsageError

    seed, strength = sampling.variation_seed, sampling.variation_strength
    if seed is None and strength is None:
        return
    if seed is None:
        raise UsageError(f"--variation-strength {strength:g} needs --variation-seed")
    if strength is None:
        raise UsageError(f"--variation-seed {seed} needs --variation-strength (0..1)")
    if not 0.0 <= strength <= 1.0:  # the option's own range check lets nan through
        raise UsageError(f"--variation-strength must be between 0 and 1, got {strength:g}")
