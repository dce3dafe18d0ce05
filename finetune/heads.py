"""Classification heads on top of the backbone: linear, MLP and Fluffy, with cls, mean, max or attention pooling.

`linear` is exactly transformers' `ASTMLPHead` (LayerNorm + Linear on the pooled cls/distillation embedding, parameter
names `layernorm` and `dense`), so a linear-head model exports as an `ASTForAudioClassification` folder. `fluffy` gives
every instrument its own small binary classifier on the shared embedding (and, with attention pooling, its own query over
the patch tokens), so one instrument's decision boundary does not compete with another's for the same output layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

Kind = Literal["linear", "mlp", "fluffy"]
Pooling = Literal["cls", "mean", "max", "meanmax", "attention"]
HEADS, POOLINGS = get_args(Kind), get_args(Pooling)


@dataclass
class HeadConfig:
    """Which head, how it pools the backbone output, and its size."""

    kind: Kind = "fluffy"
    # cls: mean of cls & distillation tokens (AST pooler_output); mean: mean of the patch tokens, AudioMAE's probe
    # input (an MAE-pretrained cls token never gets a training signal); max: each feature's largest value over the
    # patch tokens (what one region holds decides; cpu-synth.yaml measures it against the others); meanmax: mean plus
    # max (PANNs' clip pooling); attention: learned queries
    pooling: Pooling = "cls"
    hidden: int = 256  # mlp hidden width; fluffy: width of each instrument's head
    dropout: float = 0.1


class AttentionPool(nn.Module):
    """Learned queries attend over the patch tokens: (B, K, D) -> (B, Q, D), one pooled vector per query."""

    def __init__(self, *, dim: int, queries: int = 1, heads: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.norm(tokens)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attention(queries, tokens, tokens, need_weights=False)
        return pooled


class LinearHead(nn.Module):
    """transformers' ASTMLPHead: LayerNorm then one Linear layer."""

    def __init__(self, *, dim: int, classes: int, eps: float = 1e-12):
        super().__init__()
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.dense(self.layernorm(pooled))


class MLPHead(nn.Module):
    """LayerNorm, one hidden GELU layer, dropout, Linear."""

    def __init__(self, *, dim: int, classes: int, hidden: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(self.layernorm(pooled))


class FluffyHead(nn.Module):
    """One independent two-layer binary classifier per instrument, evaluated together with batched einsums.

    `pooled` is (B, D) (every instrument reads the shared embedding) or (B, C, D) (each instrument reads its own
    attention-pooled vector).
    """

    def __init__(self, *, dim: int, classes: int, hidden: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.w1 = nn.Parameter(torch.empty(classes, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(classes, hidden))
        self.w2 = nn.Parameter(torch.empty(classes, hidden))
        self.b2 = nn.Parameter(torch.zeros(classes))
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.w1, std=1 / math.sqrt(dim))
        nn.init.trunc_normal_(self.w2, std=1 / math.sqrt(hidden))

    def forward(self, pooled: Tensor) -> Tensor:
        pooled = self.layernorm(pooled)
        if pooled.dim() == 2:
            hidden = einsum(pooled, self.w1, "b d, c d h -> b c h")
        else:
            hidden = einsum(pooled, self.w1, "b c d, c d h -> b c h")
        hidden = self.dropout(nn.functional.gelu(hidden + self.b1))
        return einsum(hidden, self.w2, "b c h, c h -> b c") + self.b2


class Head(nn.Module):
    """Pooling plus classifier: BackboneOutput -> (B, classes) logits."""

    def __init__(self, *, config: HeadConfig, dim: int, classes: int, eps: float = 1e-12):
        super().__init__()
        if config.kind not in HEADS:
            raise ValueError(f"head kind must be one of {', '.join(HEADS)}; got {config.kind!r}")
        if config.pooling not in POOLINGS:
            raise ValueError(f"head pooling must be one of {', '.join(POOLINGS)}; got {config.pooling!r}")
        self.config = config
        self.pool = None
        if config.pooling == "attention":
            queries = classes if config.kind == "fluffy" else 1
            self.pool = AttentionPool(dim=dim, queries=queries)
        if config.kind == "linear":
            self.classifier: nn.Module = LinearHead(dim=dim, classes=classes, eps=eps)
        elif config.kind == "mlp":
            self.classifier = MLPHead(dim=dim, classes=classes, hidden=config.hidden, dropout=config.dropout, eps=eps)
        else:
            self.classifier = FluffyHead(dim=dim, classes=classes, hidden=config.hidden, dropout=config.dropout, eps=eps)

    def pooled(self, tokens: Tensor, embedding: Tensor) -> Tensor:
        """What the classifier reads: the cls/distillation embedding, the mean or max patch token (or both), or the
        attention-pooled tokens."""
        if self.config.pooling == "mean":
            return tokens.mean(dim=1)
        if self.config.pooling == "max":
            return tokens.amax(dim=1)
        if self.config.pooling == "meanmax":
            return tokens.mean(dim=1) + tokens.amax(dim=1)
        if self.pool is None:
            return embedding
        pooled = self.pool(tokens)
        return rearrange(pooled, "b 1 d -> b d") if pooled.shape[1] == 1 else pooled

    def forward(self, tokens: Tensor, embedding: Tensor) -> Tensor:
        return self.classifier(self.pooled(tokens, embedding))

    @property
    def exportable(self) -> bool:
        """True when transformers' ASTForAudioClassification computes exactly this head."""
        return self.config.kind == "linear" and self.config.pooling == "cls"
