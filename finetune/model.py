"""The fine-tuned classifier: waveform -> log-mel -> backbone (with adapters or LoRA) -> head -> instrument logits.

Its folder format is `finetune.folder`; windowed inference over whole files is `finetune.inference`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from finetune.adapters import scale_grad
from finetune.heads import Head, HeadConfig
from pretrain.backbone import Backbone
from pretrain.encoder import AudioEncoder
from pretrain.frontend import SpecAugment
from pretrain.objectives import mask_from_scores, random_scores
from shards.vocab import INSTRUMENTS


class Classifier(AudioEncoder):
    """Waveform (B, samples) -> instrument logits (B, classes); log-mel and SpecAugment run inside, on the device.

    With `patchout` > 0, training steps drop that fraction of each clip's patch tokens at random before the first
    block (PaSST's unstructured Patchout: fewer tokens per step, and a regulariser); evaluation sees every patch.
    """

    def __init__(self, *, backbone: Backbone, head: HeadConfig, classes: int = len(INSTRUMENTS),
                 adapters: nn.ModuleList | None = None, spec_augment: SpecAugment | None = None,
                 patchout: float = 0.0, warp: float = 0.0):
        super().__init__(backbone=backbone, spec_augment=spec_augment, warp=warp)
        self.adapters = adapters  # run by forward hooks on the backbone's blocks (see finetune.adapters)
        self.head = Head(config=head, dim=backbone.hidden_size, classes=classes, eps=backbone.config.layer_norm_eps)
        self.patchout = patchout

    def forward(self, audio: Tensor, *, backbone_grad: float = 1.0) -> Tensor:
        """`backbone_grad` 0 during head-only warm-up: the backbone runs but receives zero gradient."""
        features = self.features(audio)
        keep = None
        if self.training and self.patchout:
            grid = self.backbone.grid(features.shape[1])
            keep, _ = mask_from_scores(random_scores(features.shape[0], grid, features.device), self.patchout)
        output = self.backbone(features, keep=keep)
        tokens, embedding = output.tokens, output.embedding
        if backbone_grad != 1.0:
            tokens, embedding = scale_grad(tokens, backbone_grad), scale_grad(embedding, backbone_grad)
        return self.head(tokens, embedding)

    @torch.inference_mode()
    def predict(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(probabilities (B, classes), pooled embedding (B, D)) in eval mode."""
        output = self.encode(audio)
        logits = self.head(output.tokens, output.embedding)
        return torch.sigmoid(logits.float()), output.embedding.float()
