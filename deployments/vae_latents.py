"""Images in and out of a VAE's latent space the way the diffusers pipelines do it, and
synthetic pictures to probe a VAE with.

The pipelines do not feed a VAE's raw latents to the denoiser: SDXL-style pipelines scale
them (``scaling_factor``, or ``latents_mean``/``latents_std`` when the config has them),
FLUX-style ones shift and scale them (``shift_factor``), Qwen-Image's normalise them per
channel (``latents_mean``/``latents_std``) and its video VAE takes images as
``[B, C, 1, H, W]``. ``encode_like_pipeline`` / ``decode_like_pipeline`` follow each, so
code that studies a loaded VAE (``deployments.previews`` fits its linear latent-to-RGB
preview on it with ``synthetic_images``) sees the latents the pipeline sees.

Supported: ``AutoencoderKL`` (SDXL- and FLUX-style configs) and ``AutoencoderKLQwenImage``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "decode_like_pipeline",
    "encode_like_pipeline",
    "from_vae_output",
    "is_video_vae",
    "latent_affine",
    "synthetic_images",
    "to_vae_input",
]


# ----------------------------------------------------------------------------------------
# VAE conventions (how the pipelines normalise latents)


def is_video_vae(vae) -> bool:
    # AutoencoderKLQwenImage (and Wan-style VAEs) take [B, C, T, H, W] and have z_dim.
    return hasattr(vae.config, "z_dim") and not hasattr(vae.config, "latent_channels")


def to_vae_input(vae, x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if is_video_vae(vae) else x


def from_vae_output(vae, x: torch.Tensor) -> torch.Tensor:
    return x[:, :, 0] if is_video_vae(vae) else x


def latent_affine(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, scale) such that pipeline_latents = (raw - offset) * scale."""
    cfg = vae.config
    if is_video_vae(vae):  # QwenImage pipelines: (z - latents_mean) / latents_std
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=like.dtype).view(shape)
        return mean, 1.0 / std
    channels = cfg.latent_channels
    shape = (1, channels, 1, 1)
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # SDXL pipelines with latents_mean/std in the config
        mean_t = torch.tensor(mean, dtype=like.dtype).view(shape)
        std_t = torch.tensor(std, dtype=like.dtype).view(shape)
        return mean_t, cfg.scaling_factor / std_t
    shift = getattr(cfg, "shift_factor", None) or 0.0  # FLUX / SD3: (z - shift) * scale
    return torch.full(shape, float(shift), dtype=like.dtype), torch.full(
        shape, float(cfg.scaling_factor), dtype=like.dtype
    )


def encode_like_pipeline(vae, images: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W] -> latents as an img2img pipeline prepares them.

    ``sample=True`` draws from the posterior with ``generator`` (what the SDXL, FLUX and
    Qwen-Image img2img/inpaint pipelines do); ``sample=False`` uses its mean.
    """
    dist = vae.encode(to_vae_input(vae, images)).latent_dist
    raw = dist.sample(generator) if sample else dist.mode()
    offset, scale = latent_affine(vae, raw)
    return (raw - offset.to(raw.device)) * scale.to(raw.device)


def decode_like_pipeline(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pipeline-space latents -> images in [-1, 1], [B, 3, H, W], as the pipelines decode."""
    offset, scale = latent_affine(vae, latents)
    raw = latents / scale.to(latents.device) + offset.to(latents.device)
    return from_vae_output(vae, vae.decode(raw).sample)


# ----------------------------------------------------------------------------------------
# Synthetic images


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen)


def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` varied images in [-1, 1], shape [n, 3, size, size], drawn from ``generator``:
    gradients, low-frequency colour fields, soft blobs, rectangles, a disc, noise texture."""
    g = generator
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    yy, xx = yy.expand(n, 1, size, size), xx.expand(n, 1, size, size)

    def colors(k=1):
        return _rand(g, n, 3, 1, 1) * 2 - 1 if k == 1 else _rand(g, n, k, 3, 1, 1) * 2 - 1

    # 1. linear gradient between two colours in a random direction
    angle = _rand(g, n, 1, 1, 1) * (2 * math.pi)
    t = (xx - 0.5) * torch.cos(angle) + (yy - 0.5) * torch.sin(angle)
    t = (t / 0.71 + 0.5).clamp(0, 1)
    c0, c1 = colors(), colors()
    img = c0 + (c1 - c0) * t
    # 2. smooth low-frequency colour field
    for cells, amp in ((3, 0.6), (6, 0.3)):
        field = torch.randn(n, 3, cells, cells, generator=g)
        field = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)
        img = img + field * (_rand(g, n, 1, 1, 1) * amp)
    # 3. soft blobs
    for _ in range(3):
        cx, cy = _rand(g, n, 1, 1, 1), _rand(g, n, 1, 1, 1)
        sigma = 0.04 + _rand(g, n, 1, 1, 1) * 0.2
        present = (_rand(g, n, 1, 1, 1) < 0.7).float()
        alpha = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) * present
        img = img * (1 - alpha) + colors() * alpha
    # 4. hard-edged rectangles (and, half of the time, a hard-edged disc)
    for _ in range(3):
        a, b = _rand(g, n, 2, 1, 1), _rand(g, n, 2, 1, 1)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        present = (_rand(g, n, 1, 1, 1) < 0.7).float()
        inside = (xx >= lo[:, :1]) & (xx <= hi[:, :1]) & (yy >= lo[:, 1:]) & (yy <= hi[:, 1:])
        alpha = inside.float() * present
        img = img * (1 - alpha) + colors() * alpha
    cx, cy, r = _rand(g, n, 1, 1, 1), _rand(g, n, 1, 1, 1), 0.05 + _rand(g, n, 1, 1, 1) * 0.25
    alpha = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r**2).float() * (_rand(g, n, 1, 1, 1) < 0.5).float()
    img = img * (1 - alpha) + colors() * alpha
    # 5. noise texture: pixel noise and a little 2x2-grain noise, of random strength
    img = img + torch.randn(n, 3, size, size, generator=g) * (_rand(g, n, 1, 1, 1) * 0.08)
    grain = torch.randn(n, 1, size // 2, size // 2, generator=g)
    img = img + F.interpolate(grain, scale_factor=2, mode="nearest") * (_rand(g, n, 1, 1, 1) * 0.08)
    return img.clamp(-1, 1)
