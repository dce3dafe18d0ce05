"""Waveforms -> normalised log-mel features on the training device, batched.

The features are the ones transformers' `ASTFeatureExtractor` computes (Kaldi fbank through
`torchaudio.compliance.kaldi.fbank`: 25 ms Hann window, 10 ms hop, DC removal, pre-emphasis 0.97,
512-point power spectrum, 128 Kaldi mel bins from 20 Hz to Nyquist, natural log, no dither, no
energy; then `(fbank - mean) / (2 * std)`), so a backbone trained here sees what `AutoFeatureExtractor`
gives its users, to float32 rounding (within ~1e-4 of a normalised unit; up to 1.1e-4 in the lowest mel
bins on some CPUs). Kaldi's reference works on one waveform at a time on the CPU; this module does the
same arithmetic on a (batch, samples) tensor wherever it lives, in an order that costs less
(`LogMel.power_spectrum`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchaudio.compliance.kaldi import get_mel_banks

PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi's floor before the log


@dataclass
class FrontendConfig:
    """Everything that defines the features; mean/std are AST's AudioSet statistics."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    mean: float = -4.2677393
    std: float = 4.5689974

    @property
    def window_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def hop_length(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def fft_length(self) -> int:
        return 1 << math.ceil(math.log2(self.window_length))

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi makes with `snip_edges=True`: only whole windows, no padding."""
        if num_samples < self.window_length:
            return 0
        return 1 + (num_samples - self.window_length) // self.hop_length

    def num_samples(self, num_frames: int) -> int:
        """The fewest samples that make `num_frames` frames (the inverse of `num_frames`)."""
        return self.window_length + (num_frames - 1) * self.hop_length


WARP_STEPS = 9  # warp factors on a grid from 1 - warp to 1 + warp; each training clip draws one


def check_warp(warp: float) -> None:
    """ValueError unless `warp` (the largest relative frequency stretch) lies in [0, 0.5)."""
    if not 0 <= warp < 0.5:
        raise ValueError(f"warp is the largest relative frequency stretch, in [0, 0.5); got {warp}")


def mel_banks(config: FrontendConfig, warp_factor: float = 1.0) -> Tensor:
    """(bins, mels) Kaldi mel filterbank, its frequency axis warped by `warp_factor` as Kaldi's VTLN warps it."""
    banks, _ = get_mel_banks(config.num_mel_bins, config.fft_length, float(config.sample_rate), LOW_FREQ, 0.0, 100.0,
                             -500.0, warp_factor)
    banks = F.pad(banks, (0, 1))  # Kaldi's banks stop one bin short of Nyquist
    return rearrange(banks, "mel bin -> bin mel").contiguous()


class LogMel(nn.Module):
    """(B, samples) waveform at `sample_rate` -> (B, frames, mels) normalised log-mel features.

    With `warp` > 0, each clip in training mode gets its filterbank's frequency axis stretched by a random factor in
    [1 - warp, 1 + warp] (vocal tract length perturbation, Jaitly & Hinton 2013, through Kaldi's VTLN warp): pitch and
    spectral envelope move together, as they do between two instruments' bodies or two sample sets. Evaluation, and
    every exported model, computes the unwarped features.
    """

    def __init__(self, *, config: FrontendConfig = FrontendConfig(), warp: float = 0.0) -> None:
        super().__init__()
        check_warp(warp)
        self.config = config
        self.register_buffer("mel_banks", mel_banks(config), persistent=False)
        self.register_buffer("window", torch.hann_window(config.window_length, periodic=False), persistent=False)
        factors = torch.linspace(1 - warp, 1 + warp, WARP_STEPS).tolist()
        warped = torch.stack([mel_banks(config, factor) for factor in factors]) if warp else torch.empty(0)
        self.register_buffer("warped_banks", warped, persistent=False)  # (WARP_STEPS, bins, mels)

    def num_frames(self, num_samples: int) -> int:
        return self.config.num_frames(num_samples)

    def forward(self, waveform: Tensor) -> Tensor:
        config = self.config
        if waveform.shape[-1] < config.window_length:
            raise ValueError(f"need at least {config.window_length} samples for one frame, got {waveform.shape[-1]}")
        # Features stay in fp32 under bf16/fp16 autocast: the log of small mel energies needs the precision.
        with torch.autocast(waveform.device.type, enabled=False):
            power = self.power_spectrum(waveform.float())
            if self.training and len(self.warped_banks):
                chosen = torch.randint(len(self.warped_banks), (power.shape[0],), device=power.device)
                fbank = torch.bmm(power, self.warped_banks[chosen].float())
            else:
                fbank = torch.matmul(power, self.mel_banks.float())
            fbank = fbank.clamp_min(LOG_FLOOR).log()
            return (fbank - config.mean) / (2 * config.std)

    def power_spectrum(self, waveform: Tensor) -> Tensor:
        """(B, samples) -> (B, frames, fft_length // 2 + 1) Kaldi's power spectrum: per frame, remove the mean,
        pre-emphasise (a frame's first sample against itself), apply the window, |FFT|^2.

        The same arithmetic in an order that touches the (B, frames, window) tensor twice instead of six times (the
        frontend takes 16-22 ms instead of 32-43 for 32 clips of 3 s on 2 CPU cores): pre-emphasis is linear, so it
        runs once on the waveform, and the frame's mean comes off afterwards as (1 - PREEMPHASIS) x mean; a frame's
        first sample meets the window's zero, so Kaldi's rule for it drops out. Removing the clip's mean first changes
        nothing but the rounding (every frame loses its own mean anyway) and keeps that subtraction small."""
        config, window = self.config, self.window.float()
        waveform = waveform - waveform.mean(dim=-1, keepdim=True)
        emphasised = F.pad(waveform[..., 1:] - PREEMPHASIS * waveform[..., :-1], (1, 0))  # sample 0: see above
        means = waveform.unfold(-1, config.window_length, config.hop_length).mean(dim=-1, keepdim=True)
        frames = emphasised.unfold(-1, config.window_length, config.hop_length) * window  # (B, frames, window)
        frames.addcmul_(means, window, value=PREEMPHASIS - 1)
        spectrum = torch.fft.rfft(frames, n=config.fft_length)
        return spectrum.real.square() + spectrum.imag.square()


class SpecAugment(nn.Module):
    """Random frequency and time stripes set to zero (the normalised mean), one draw per clip; a no-op in eval()."""

    def __init__(self, *, freq_mask: int = 24, time_mask: int = 48, num_freq_masks: int = 2, num_time_masks: int = 2) -> None:
        super().__init__()
        self.freq_mask = freq_mask
        self.time_mask = time_mask
        self.num_freq_masks = num_freq_masks
        self.num_time_masks = num_time_masks

    def forward(self, features: Tensor) -> Tensor:
        """features (B, frames, mels) -> the same with stripes masked."""
        if not self.training:
            return features
        batch, frames, mels = features.shape
        drop = stripes(batch, frames, self.time_mask, self.num_time_masks, features.device)[:, :, None]
        drop = drop | stripes(batch, mels, self.freq_mask, self.num_freq_masks, features.device)[:, None, :]
        return features.masked_fill(drop, 0.0)


class ResizeCrop(nn.Module):
    """Random resize crop (BYOL-A's RRC, Niizumi et al. 2021), one draw per clip; a no-op in eval().

    A window of `frequency_scale` x `time_scale` times the clip's mel bins x frames, at a random place, stretched
    back to the clip's shape. Below 1 a scale zooms in (fewer bins or frames spread over all of them: about a
    transposition and a slower tempo), above 1 it zooms out (the clip shrunk inside the frame, the rest at the
    normalised mean, 0). Defaults are BYOL-A's: the band only narrows, time runs 0.6x to 1.5x.
    """

    def __init__(self, *, frequency_scale: tuple[float, float] = (0.6, 1.0),
                 time_scale: tuple[float, float] = (0.6, 1.5)) -> None:
        super().__init__()
        for low, high in (frequency_scale, time_scale):
            if not 0 < low <= high:
                raise ValueError(f"resize-crop scales are ranges 0 < low <= high, got {low}, {high}")
        self.frequency_scale = frequency_scale
        self.time_scale = time_scale

    def forward(self, features: Tensor) -> Tensor:
        """features (B, frames, mels) -> the same shape, each clip resize-cropped."""
        if not self.training:
            return features
        batch, frames, mels = features.shape
        device = features.device

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(batch, device=device)

        # affine_grid's x runs along the last axis (mels), y along frames; both span [-1, 1].
        scale = torch.stack([uniform(*self.frequency_scale), uniform(*self.time_scale)], dim=1)  # (B, 2)
        shift = (2 * torch.rand(batch, 2, device=device) - 1) * (1 - scale).abs()  # the window stays in the frame
        theta = torch.cat([torch.diag_embed(scale), shift[:, :, None]], dim=2)  # (B, 2, 3)
        with torch.autocast(device.type, enabled=False):
            grid = F.affine_grid(theta, [batch, 1, frames, mels], align_corners=False)
            cropped = F.grid_sample(features.float()[:, None], grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
        return cropped[:, 0].to(features.dtype)


def stripes(batch: int, length: int, width: int, count: int, device: torch.device) -> Tensor:
    """(batch, length) bool: `count` stripes per row, each of a uniform width in [0, width) at a uniform start."""
    positions = torch.arange(length, device=device)
    widths = (torch.rand(batch, count, 1, device=device) * min(width, length)).long()
    starts = (torch.rand(batch, count, 1, device=device) * (length - widths + 1)).long()
    inside = (positions >= starts) & (positions < starts + widths)
    return inside.any(dim=1)
