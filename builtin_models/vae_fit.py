"""Fit a tiny, randomly initialised diffusers VAE so that encode + decode reconstructs images.

``fit_vae(vae)`` changes the VAE in place, in seconds on one CPU thread and deterministically,
so that an image survives the round trip that image-to-image / inpainting pipelines make and
img2img at a low strength stays close to its input.

Supported: ``AutoencoderKL`` (SDXL- and FLUX-style configs: ``scaling_factor``,
``shift_factor``, optional ``latents_mean``/``latents_std``) and ``AutoencoderKLQwenImage`` (a
video VAE: images go in as ``[B, C, 1, H, W]``; ``latents_mean``/``latents_std``).

Two stages:

1. ``structured_init``: trained from scratch, these tiny VAEs learn an image's layout within a
   few hundred steps but not its colours, because every encoder and decoder ends in a
   per-image normalisation (GroupNorm over channels x space; RMS norm over channels) that
   removes what a plain conv stack would use to carry absolute colour. So the VAE is first
   set to a known autoencoder: 8x8 block means in, nearest upsampling out, with the colour
   carried through the norms exactly (details below). Residual branches start at zero.
2. Adam fine-tuning on synthetic images drawn from the seed (gradients, low-frequency colour
   fields, soft blobs, rectangles, discs, noise texture). Loss, in pixel units of [-1, 1]:
   MSE of decode(posterior *sample*) (the SDXL, FLUX and Qwen-Image img2img/inpaint pipelines
   all encode with ``latent_dist.sample(generator)``, so the posterior must stay narrow), plus
   optionally MSE of decode(mean), plus a small moment penalty pulling the latents *as the
   pipeline sees them* (after shift/scale or mean/std) toward mean 0 / std 1 per channel, the
   scale the noise schedules assume (with SDXL's scaling_factor 0.13 unconstrained latents
   would be ~10x too small next to the noise and a low strength would wash the image out).

The synthetic images and the pipelines' image-to-latent conventions are production code
(``deployments.vae_latents``: the streamed previews fit their latent-to-RGB map to any
loaded VAE with them); this module, which only the built-in tiny models need, uses them.

The caller's global state is left alone: the global RNG is forked, the thread count is
restored, so are ``requires_grad`` flags and train/eval mode, and no ``.grad`` is left behind.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from deployments.vae_latents import (
    decode_like_pipeline,
    encode_like_pipeline,
    from_vae_output,
    is_video_vae,
    latent_affine,
    synthetic_images,
    to_vae_input,
)

__all__ = [
    "default_steps",
    "fit_vae",
    "roundtrip_mae",
    "structured_init",
]


# ----------------------------------------------------------------------------------------
# Measuring a fit


@torch.no_grad()
def roundtrip_mae(vae, images: torch.Tensor, generator=None, sample: bool = True) -> float:
    """Mean absolute error (in [-1, 1] units) of decode(encode(images)) the pipeline way."""
    out = decode_like_pipeline(vae, encode_like_pipeline(vae, images, generator, sample)).clamp(-1, 1)
    return (out - images).abs().mean().item()


# ----------------------------------------------------------------------------------------
# Structured initialisation
#
# Trained from scratch, these tiny VAEs learn the spatial layout of an image within a few
# hundred steps but not its colours: every encoder and decoder ends in a per-image
# normalisation (GroupNorm over channels x space, or RMS norm over channels), which removes
# exactly the information that a plain conv stack would use to carry absolute colour.
# So, before training, the VAE is set to a known good autoencoder: the encoder averages each
# 8x8 block of the image and the decoder upsamples it back. Residual branches and attention
# outputs start at zero (identity blocks); resampling convs average / copy; and the colour
# passes the final normalisation layers intact because the residual stream carries it as
# [u, -u, K, -K] with a large constant K:
#   * group mean of [u, -u, K, -K] is exactly 0 and its variance is dominated by K, so
#     GroupNorm is linear in u (to ~|u|^2/K^2);
#   * RMS norm divides by |x| ~ K, again linear in u, and
#   * silu(y) - silu(-y) == y exactly, so the convs after the activation read u back.
# Training then starts from ~bilinear-quality reconstructions and improves on them.

_K = 50.0  # the constant channel; signal is |u| <= 1


def _zero(module) -> None:
    for p in module.parameters():
        p.data.zero_()


def _center(conv) -> tuple:
    # The tap that sees the current pixel (and, for causal 3D convs, the current frame: the
    # time padding is all in front, so it is the last time tap).
    k = conv.weight.shape[2:]
    if len(k) == 3:
        return (k[0] - 1, k[1] // 2, k[2] // 2)
    return tuple(n // 2 for n in k)


def _set_conv(conv, entries, bias=None, taps=None) -> None:
    """Zero ``conv`` then set weight[out, in, tap] = value for (out, in, value) in entries."""
    w = conv.weight.data
    w.zero_()
    taps = taps or [(_center(conv), 1.0)]
    for out_c, in_c, value in entries:
        for tap, tw in taps:
            w[(out_c, in_c, *tap)] = value * tw
    if conv.bias is not None:
        conv.bias.data.zero_()
        for out_c, value in (bias or {}).items():
            conv.bias.data[out_c] = value


def _identity(conv, n: int, taps=None) -> None:
    _set_conv(conv, [(c, c, 1.0) for c in range(n)], taps=taps)


_STREAM = 8  # residual-stream channels used: u (3), -u (3), +K, -K


def _stream_in(conv, gains, offsets) -> None:
    """conv maps its input channels c (< 3) to the stream: u_c = gains[c] * (in_c - offsets[c])."""
    entries, bias = [], {6: _K, 7: -_K}
    for c in range(3):
        entries += [(c, c, gains[c]), (c + 3, c, -gains[c])]
        bias[c] = -gains[c] * offsets[c]
        bias[c + 3] = gains[c] * offsets[c]
    _set_conv(conv, entries, bias)


def _norm_gain(norm) -> float:
    """Gain g so that g * norm(stream)[c] == u_c (c < 3) for the layout above."""
    if isinstance(norm, torch.nn.GroupNorm):
        group = norm.num_channels // norm.num_groups
        return math.sqrt(2 * _K**2 / group)  # std of [u,-u,K,-K,0..] over a group ~ K sqrt(2/group)
    channels = norm.gamma.shape[0]  # QwenImageRMS_norm: x / |x| * sqrt(C), |x| ~ sqrt(2) K
    return math.sqrt(2) * _K / math.sqrt(channels)


def _set_norm(norm) -> None:
    g = _norm_gain(norm)
    if isinstance(norm, torch.nn.GroupNorm):
        norm.weight.data.fill_(1.0)
        norm.weight.data[:6] = g
        norm.bias.data.zero_()
    else:
        norm.gamma.data.fill_(1.0)
        norm.gamma.data[:6] = g
        if isinstance(norm.bias, torch.nn.Parameter):
            norm.bias.data.zero_()


def _stream_out(conv, rows) -> None:
    """conv reads silu(norm(stream)): out_o = sum_c rows[o][c] * u_c + bias (rows: {o: ([w0,w1,w2], b)})."""
    entries, bias = [], {}
    for o, (ws, b) in rows.items():
        for c in range(3):
            entries += [(o, c, ws[c]), (o, c + 3, -ws[c])]
        bias[o] = b
    _set_conv(conv, entries, bias)


def _linearisable(vae) -> bool:
    if is_video_vae(vae):
        dec_c = vae.decoder.norm_out.gamma.shape[0]
        enc_c = vae.encoder.norm_out.gamma.shape[0]
        return min(dec_c, enc_c) >= _STREAM and vae.config.z_dim >= 3
    if not hasattr(vae, "encoder") or not hasattr(vae.encoder, "conv_norm_out"):
        return False
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        if not isinstance(norm, torch.nn.GroupNorm) or norm.num_channels // norm.num_groups < _STREAM:
            return False
    for m in vae.modules():
        if type(m).__name__ == "ResnetBlock2D" and m.output_scale_factor != 1.0:
            return False
        if type(m).__name__ == "Downsample2D" and (m.padding != 0 or not m.use_conv):
            return False
        if type(m).__name__ == "Upsample2D" and (not m.use_conv or m.use_conv_transpose):
            return False
    c0 = vae.encoder.conv_in.out_channels
    return c0 >= _STREAM and vae.config.latent_channels >= 3


def _identity_blocks(module) -> None:
    """Zero every residual branch and attention output below ``module`` (blocks become identities).

    The branches' input norms get the colour gain, so that a branch sees u at unit scale once
    it starts learning (the stream holds u next to K = 50).
    """
    for m in module.modules():
        name = type(m).__name__
        if name in ("ResnetBlock2D", "QwenImageResidualBlock"):
            _zero(m.conv2)
            if m.norm1.__class__ is torch.nn.GroupNorm or hasattr(m.norm1, "gamma"):
                _set_norm(m.norm1)
            shortcut = getattr(m, "conv_shortcut", None)
            if isinstance(shortcut, torch.nn.Conv2d | torch.nn.Conv3d):
                _identity(shortcut, min(shortcut.in_channels, shortcut.out_channels))
        elif name == "Attention":
            _zero(m.to_out[0])
        elif name == "QwenImageAttentionBlock":
            _zero(m.proj)


def _frozen_params(vae) -> set[int]:
    """Parameters that read the raw residual stream (which holds K = 50): the resampling convs
    and the 1x1 shortcuts. Adam would move their zero entries by ~lr a step, and every such
    step on a weight that reads K moves the stream by 50x that; they stay as initialised."""
    frozen = set()
    for m in vae.modules():
        name = type(m).__name__
        if name in ("Downsample2D", "Upsample2D", "QwenImageResample"):
            frozen.update(id(p) for p in m.parameters())
        elif name in ("ResnetBlock2D", "QwenImageResidualBlock"):
            shortcut = getattr(m, "conv_shortcut", None)
            if isinstance(shortcut, torch.nn.Module):
                frozen.update(id(p) for p in shortcut.parameters())
    return frozen


@torch.no_grad()
def structured_init(vae, *, latent_gain: float = 2.0, posterior_std: float = 0.02) -> bool:
    """Set ``vae`` to an 8x8-block-average encoder and an upsampling decoder (see above).

    In pipeline space (after the pipeline's shift/scale or mean/std normalisation) latent
    channels 0-2 are ``latent_gain`` x the block-mean R, G, B and channel 3 (if any) their
    mean; the posterior std is ``posterior_std`` there. Returns False (and changes nothing)
    when the architecture cannot carry colour linearly (normalisation groups < 8 channels).
    """
    if not _linearisable(vae):
        return False
    video = is_video_vae(vae)
    n_lat = vae.config.z_dim if video else vae.config.latent_channels
    like = next(vae.parameters())
    offset, scale = latent_affine(vae, like)
    offset, scale = offset.flatten().tolist(), scale.flatten().tolist()
    mix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] + [[1 / 3, 1 / 3, 1 / 3]] * (n_lat - 3)
    # pixel value of channel c in the stream: u_c in [-1, 1]
    enc, dec = vae.encoder, vae.decoder
    _identity_blocks(vae)
    avg = [((0, 0, 0), 0.25), ((0, 0, 1), 0.25), ((0, 1, 0), 0.25), ((0, 1, 1), 0.25)]
    avg2d = [(t[1:], w) for t, w in avg]
    if video:
        _stream_in(enc.conv_in, [1.0] * 3, [0.0] * 3)
        for layer in enc.down_blocks:
            if type(layer).__name__ == "QwenImageResample":
                _identity(layer.resample[1], _STREAM, taps=avg2d)
        _set_norm(enc.norm_out)
        enc_out, quant = enc.conv_out, vae.quant_conv
    else:
        _stream_in(enc.conv_in, [1.0] * 3, [0.0] * 3)
        for block in enc.down_blocks:
            for ds in block.downsamplers or []:
                _identity(ds.conv, _STREAM, taps=avg2d)
        _set_norm(enc.conv_norm_out)
        enc_out, quant = enc.conv_out, vae.quant_conv
    # encoder head: mean = raw latents (pipeline z = latent_gain * mix @ u), logvar = constant
    rows = {}
    for l in range(n_lat):
        w = [latent_gain * m / scale[l] for m in mix[l]]
        rows[l] = (w, offset[l])
        rows[n_lat + l] = ([0.0, 0.0, 0.0], 2 * math.log(posterior_std / abs(scale[l])))
    _stream_out(enc_out, rows)
    if quant is not None:
        _identity(quant, 2 * n_lat)
    # decoder: latents -> stream (u_c = (raw_c - offset_c) * scale_c / latent_gain), upsample, head
    post = vae.post_quant_conv
    if post is not None:
        _identity(post, n_lat)
    _stream_in(dec.conv_in, [s / latent_gain for s in scale[:3]], offset[:3])
    if video:
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                _identity(up.resample[1], _STREAM)
        _set_norm(dec.norm_out)
    else:
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                _identity(up.conv, _STREAM)
        _set_norm(dec.conv_norm_out)
    _stream_out(dec.conv_out, {c: ([1.0 if i == c else 0.0 for i in range(3)], 0.0) for c in range(3)})
    return True


# ----------------------------------------------------------------------------------------
# Fitting


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def default_steps(vae) -> tuple[int, int]:
    """(steps, batch_size) used when fit_vae is not told: ~10-15 s on one CPU thread at 64x64.

    The Qwen-Image video VAE costs ~3x more per image (its causal 3D convs), so it gets fewer
    steps and a smaller batch."""
    return (80, 4) if is_video_vae(vae) else (150, 8)


def fit_vae(
    vae,
    *,
    seed: int = 0,
    steps: int | None = None,
    size: int = 64,
    batch_size: int | None = None,
    lr: float | None = None,
    mean_weight: float = 0.0,
    moment_weight: float = 1e-2,
    threads: int | None = 1,
    init: bool = True,
) -> bool:
    """Train ``vae`` in place so that decode(encode(x)) ~= x for images x in [-1, 1].

    First ``structured_init`` (unless ``init=False``), then ``steps`` Adam steps (warm-up +
    cosine) on batches of ``batch_size`` synthetic ``size`` x ``size`` images; ``None`` picks
    ``default_steps(vae)``. Deterministic for a given ``seed`` and thread count: data and
    posterior noise come from generators seeded by ``seed``, the init is deterministic, and the
    global RNG is forked so the caller's RNG state is untouched. ``threads`` is the intra-op
    thread count while fitting (restored afterwards; ``None`` keeps the current one).

    Returns whether the structured init applied. When it cannot (e.g. a GroupNorm with fewer
    than 8 channels per group at the end of the encoder or decoder, such as
    ``norm_num_groups == block_out_channels[0]``), the VAE is only trained from its random
    init, which in this budget does not learn colours (see the module docstring); a warning
    says so.
    """
    auto_steps, auto_batch = default_steps(vae)
    steps = auto_steps if steps is None else steps
    batch_size = auto_batch if batch_size is None else batch_size
    params = list(vae.parameters())
    device = params[0].device
    dtype = params[0].dtype
    was_training = vae.training
    old_flags = [p.requires_grad for p in params]
    with torch.random.fork_rng(devices=[]), _threads(threads):
        torch.manual_seed(seed)
        data_gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        initialised = structured_init(vae) if init else False
        if init and not initialised:
            warnings.warn(
                f"fit_vae: {type(vae).__name__} cannot carry colour through its final normalisation "
                "layers (needs >= 8 channels per GroupNorm group there); training from random init only",
                stacklevel=2,
            )
        if lr is None:
            lr = 1e-3 if initialised else 3e-3
        frozen = _frozen_params(vae) if initialised else set()
        trained = [p for p in params if id(p) not in frozen]
        for p in params:
            p.requires_grad_(id(p) not in frozen)
        vae.train()
        opt = torch.optim.Adam(trained, lr=lr, betas=(0.9, 0.99))
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))),
        )
        try:
            for _ in range(steps):
                x = synthetic_images(batch_size, size, data_gen).to(device=device, dtype=dtype)
                dist = vae.encode(to_vae_input(vae, x)).latent_dist
                eps = torch.randn(dist.mean.shape, generator=noise_gen, device=device, dtype=dtype)
                z_sample = dist.mean + dist.std * eps  # reparameterised, as the pipelines sample
                both = torch.cat([z_sample, dist.mean]) if mean_weight > 0 else z_sample
                out = from_vae_output(vae, vae.decode(both).sample)
                loss = F.mse_loss(out[:batch_size], x)
                if mean_weight > 0:
                    loss = loss + mean_weight * F.mse_loss(out[batch_size:], x)
                if moment_weight > 0:
                    offset, scale = latent_affine(vae, dist.mean)
                    z = (dist.mean - offset.to(device)) * scale.to(device)  # pipeline-space latents
                    dims = [d for d in range(z.ndim) if d != 1]
                    ch_mean = z.mean(dim=dims)
                    ch_std = z.std(dim=dims)
                    loss = loss + moment_weight * (ch_mean.pow(2).mean() + (ch_std - 1).pow(2).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        finally:
            opt.zero_grad(set_to_none=True)
            for p, flag in zip(params, old_flags):
                p.requires_grad_(flag)
            vae.train(was_training)
    return initialised
