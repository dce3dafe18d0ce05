"""Waveform -> log-mel -> backbone: the one path from audio to the model, and how whole files are cut into windows.

Pretraining objectives (`pretrain.objectives.Pretrainer`), the fine-tuned classifier (`finetune.model.Classifier`) and
the embedder (`pretrain.embed`) all are an `AudioEncoder`, and all cut files with `cut_windows`, under one rule for
short input: a signal shorter than one window is zero-padded to one window, as the training loader pads short clips.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.backbone import Backbone, BackboneOutput
from pretrain.frontend import LogMel, SpecAugment


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Window starts covering the whole signal: every `hop`, plus one aligned to the end; [0] when shorter than a window."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def cut_windows(audio: Tensor, window: int, hop: int) -> tuple[Tensor, list[int]]:
    """(samples,) -> (windows, window) (zero-padded when shorter than one window) and the window starts."""
    starts = window_starts(audio.shape[-1], window, hop)
    if audio.shape[-1] < window:
        audio = nn.functional.pad(audio, (0, window - audio.shape[-1]))
    return torch.stack([audio[start: start + window] for start in starts]), starts


class AudioEncoder(nn.Module):
    """Waveforms (B, samples) -> BackboneOutput; log-mel (and SpecAugment while training) run inside, on the device."""

    def __init__(self, *, backbone: Backbone, spec_augment: SpecAugment | None = None, warp: float = 0.0) -> None:
        super().__init__()
        self.frontend = LogMel(config=backbone.config.frontend, warp=warp)
        self.spec_augment = spec_augment
        self.backbone = backbone

    @property
    def clip_samples(self) -> int:
        """The longest input the backbone's position grid takes, in samples."""
        return self.frontend.config.num_samples(self.backbone.config.max_frames)

    def features(self, audio: Tensor) -> Tensor:
        """(B, samples) -> (B, frames, mels), SpecAugment applied when it is set and the module is training."""
        features = self.frontend(audio)
        if self.spec_augment is not None:
            features = self.spec_augment(features)
        return features

    def encode(self, audio: Tensor) -> BackboneOutput:
        return self.backbone(self.features(audio))
