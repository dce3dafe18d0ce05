"""On-the-fly waveform augmentation of training batches, on the batch's device.

Each lever is a probability (0 switches it off) so a recipe says exactly what runs:

    gain_db   every clip scaled by a uniform gain in [-gain_db, +gain_db] dB (torch-audiomentations `Gain`)
    filters   one of low-pass, high-pass, band-pass or band-stop (the kind drawn per batch, the cutoff per clip) on
              each chosen clip: a different instrument body or microphone colours the spectrum (torch-audiomentations)
    noise     coloured noise (white to brown) at 15-40 dB SNR (torch-audiomentations `AddColoredNoise`)
    pitch     the whole batch transposed by up to +-2 semitones (torch-audiomentations `PitchShift`, one shift per
              batch: per-clip shifts cost ~1.6 s for 32 clips on 2 CPU cores)
    reverb    a synthetic room per chosen clip: the dry clip plus its convolution (torchaudio `fftconvolve`) with
              exponentially decaying noise, RT60 0.2-1.0 s, wet level -12 to -3 dB

torch-audiomentations' own `ApplyImpulseResponse` reads impulse responses from files with `torchaudio.load`,
which needs FFmpeg through torchcodec; the synthetic rooms need no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_audiomentations as ta
from torch import Tensor, nn
from torchaudio.functional import fftconvolve

PITCH_SEMITONES = 2.0
NOISE_SNR_DB = (15.0, 40.0)
RT60_S = (0.2, 1.0)
WET_DB = (-12.0, -3.0)


@dataclass
class WaveAugmentConfig:
    gain_db: float = 6.0
    filters: float = 0.0
    noise: float = 0.0
    pitch: float = 0.0
    reverb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("filters", "noise", "pitch", "reverb"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability between 0 and 1, got {getattr(self, name)}")
        if self.gain_db < 0:
            raise ValueError(f"gain_db must be at least 0, got {self.gain_db}")


class WaveAugment(nn.Module):
    """(..., samples) training audio (clips, or clips x views) -> the same shape, each clip or view augmented on its
    own as the config says; the identity in eval()."""

    def __init__(self, *, config: WaveAugmentConfig, sample_rate: int) -> None:
        super().__init__()
        self.config = config
        self.sample_rate = sample_rate
        steps = []
        if config.gain_db > 0:
            steps.append(ta.Gain(min_gain_in_db=-config.gain_db, max_gain_in_db=config.gain_db, p=1.0,
                                 output_type="tensor"))
        if config.filters > 0:
            p = config.filters  # OneOf picks the kind per batch; each clip is filtered with probability p
            steps.append(ta.OneOf([
                ta.LowPassFilter(min_cutoff_freq=1500.0, max_cutoff_freq=7000.0, p=p, output_type="tensor"),
                ta.HighPassFilter(min_cutoff_freq=40.0, max_cutoff_freq=500.0, p=p, output_type="tensor"),
                ta.BandPassFilter(min_center_frequency=400.0, max_center_frequency=4000.0,
                                  min_bandwidth_fraction=1.0, max_bandwidth_fraction=1.99, p=p, output_type="tensor"),
                ta.BandStopFilter(p=p, output_type="tensor"),
            ], p=1.0, output_type="tensor"))
        if config.noise > 0:
            steps.append(ta.AddColoredNoise(min_snr_in_db=NOISE_SNR_DB[0], max_snr_in_db=NOISE_SNR_DB[1],
                                            p=config.noise, output_type="tensor"))
        if config.pitch > 0:
            steps.append(ta.PitchShift(sample_rate=sample_rate, min_transpose_semitones=-PITCH_SEMITONES,
                                       max_transpose_semitones=PITCH_SEMITONES, mode="per_batch", p=config.pitch,
                                       output_type="tensor"))
        self.steps = nn.ModuleList(steps)

    def forward(self, audio: Tensor) -> Tensor:
        if not self.training:
            return audio
        with torch.autocast(audio.device.type, enabled=False):
            shape = audio.shape
            audio = audio.float().reshape(-1, shape[-1])
            if self.config.reverb > 0:
                audio = self.reverberate(audio)
            waves = audio[:, None]  # torch-audiomentations works on (B, channels, samples)
            for step in self.steps:
                waves = step(waves, sample_rate=self.sample_rate)
            return waves[:, 0].reshape(shape)

    def reverberate(self, audio: Tensor) -> Tensor:
        """Add a synthetic room's reverberation to a random `reverb` share of the clips; loudness is kept."""
        chosen = torch.rand(audio.shape[0], device=audio.device) < self.config.reverb
        count = int(chosen.sum())
        if count == 0:
            return audio
        length = int(RT60_S[1] * self.sample_rate)
        time = torch.arange(length, device=audio.device) / self.sample_rate
        rt60 = torch.empty(count, 1, device=audio.device).uniform_(*RT60_S)
        tail = torch.randn(count, length, device=audio.device) * torch.exp(-math.log(1000.0) * time / rt60)
        tail = tail / tail.norm(dim=-1, keepdim=True)
        dry = audio[chosen]
        wet = fftconvolve(dry, tail)[:, : audio.shape[-1]]
        level = 10 ** (torch.empty(count, 1, device=audio.device).uniform_(*WET_DB) / 20)
        mixed = dry + level * wet * (_rms(dry) / _rms(wet))
        out = audio.clone()
        out[chosen] = mixed * (_rms(dry) / _rms(mixed))
        return out


def _rms(audio: Tensor) -> Tensor:
    return audio.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-5)
