"""Spectrogram ViT: log-mel features -> patch tokens and a clip embedding.

The architecture is transformers' `ASTModel` (cls and distillation tokens, learned positions,
pre-norm blocks, final LayerNorm, pooled output = mean of the two special tokens), so weights move
losslessly to and from AST checkpoints (see `pretrain.hub`). What it adds for pretraining: inputs
shorter than `max_frames` use the matching slice of the position grid, and `keep` selects the
patches the encoder sees, so a masked autoencoder runs it on visible patches only.

Token order everywhere (patch projection, position grid, `patchify`) is frequency-major like
AST's Conv2d over the (mels x frames) image: token = f * grid_t + t.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from pretrain.frontend import FrontendConfig

# width, depth, heads. cpu-2 and cpu-4 learn in minutes on 2 CPU cores: at 300 steps of 32 single clips, 2 layers
# reach the validation LRAP of 4 (0.63 against 0.60) in half the time (94 s against 187 s); tiny, small and base are
# the DeiT/AST sizes for GPUs.
SIZES = {"cpu-2": (192, 2, 3), "cpu-4": (192, 4, 3), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


@dataclass
class BackboneConfig:
    """Everything that defines the network; `max_frames` is the longest input (and the exported AST `max_length`)."""

    hidden_size: int = 192
    num_layers: int = 12
    num_heads: int = 3
    intermediate_size: int = 768
    patch_size: int = 16
    frequency_stride: int = 16
    time_stride: int = 16
    num_mel_bins: int = 128
    max_frames: int = 1024
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    frontend: FrontendConfig = field(default_factory=FrontendConfig)

    def __post_init__(self) -> None:
        if isinstance(self.frontend, dict):
            self.frontend = FrontendConfig(**self.frontend)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_mel_bins != self.frontend.num_mel_bins:
            raise ValueError(f"num_mel_bins {self.num_mel_bins} differs from the frontend's {self.frontend.num_mel_bins}")
        if self.max_frames < self.patch_size or self.num_mel_bins < self.patch_size:
            raise ValueError(f"max_frames and num_mel_bins must be at least one patch ({self.patch_size})")
        if not (1 <= self.frequency_stride <= self.patch_size and 1 <= self.time_stride <= self.patch_size):
            raise ValueError(f"frequency_stride and time_stride must be 1..patch_size ({self.patch_size}), got "
                             f"{self.frequency_stride} and {self.time_stride}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1); got {self.dropout}")

    @classmethod
    def from_size(cls, size: str, **overrides) -> BackboneConfig:
        """A named size ("tiny", "small", "base") with MLP ratio 4; any field can be overridden."""
        if size not in SIZES:
            raise ValueError(f"unknown backbone size {size!r}; choose one of {', '.join(SIZES)}")
        width, depth, heads = SIZES[size]
        return cls(**{"hidden_size": width, "num_layers": depth, "num_heads": heads, "intermediate_size": 4 * width,
                      **overrides})

    def grid(self, frames: int) -> tuple[int, int]:
        """(frequency patches, time patches) that a Conv2d with this kernel and stride makes of `frames` frames."""
        return ((self.num_mel_bins - self.patch_size) // self.frequency_stride + 1,
                (frames - self.patch_size) // self.time_stride + 1)


@dataclass
class ModelConfig:
    """The `model:` section of both recipe schemas: a named size (SIZES) and any overrides (None keeps the size's)."""

    size: str = "tiny"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    patch_size: int | None = None  # square patches of this size, non-overlapping unless a stride below is set
    frequency_stride: int | None = None  # a stride under patch_size overlaps the patches (AST: 10)
    time_stride: int | None = None
    dropout: float | None = None

    def shaping(self) -> list[str]:
        """The overrides that are set (`model.NAME`) and shape a backbone trained from scratch, not a loaded one; the
        strides and dropout are not among them: beside a loaded backbone the strides re-grid its patches and dropout
        replaces its rate (hub.load_for_training), as `from_pretrained(..., hidden_dropout_prob=...)` does."""
        kept = ("size", "frequency_stride", "time_stride", "dropout")
        return [f"model.{f.name}" for f in fields(self) if f.name not in kept and getattr(self, f.name) is not None]

    def backbone_config(self, *, max_frames: int, frontend: FrontendConfig) -> BackboneConfig:
        """The BackboneConfig it names; raises ValueError for an unknown size or impossible shapes."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "size"}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        patch = overrides.get("patch_size", BackboneConfig.patch_size)
        overrides.setdefault("frequency_stride", patch)
        overrides.setdefault("time_stride", patch)
        return BackboneConfig.from_size(self.size, max_frames=max_frames, frontend=frontend, **overrides)


def patchify(features: Tensor, patch: int) -> Tensor:
    """(B, T, F) -> (B, N, patch*patch) non-overlapping patches in token order; frames past the last whole patch are dropped."""
    frames = features.shape[1] // patch * patch
    return rearrange(features[:, :frames], "b (t pt) (f pf) -> b (f t) (pf pt)", pt=patch, pf=patch)


def unpatchify(patches: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """(B, N, patch*patch) with grid (freq patches, time patches) -> (B, grid_t*patch, grid_f*patch); inverse of patchify."""
    return rearrange(patches, "b (f t) (pf pt) -> b (t pt) (f pf)", f=grid[0], t=grid[1], pt=patch, pf=patch)


def sincos_grid(grid_f: int, grid_t: int, dim: int) -> Tensor:
    """(grid_f, grid_t, dim) fixed 2D sin-cos positions: half the channels encode frequency, half time (as in MAE)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def encode(length: int) -> np.ndarray:
        angles = np.outer(np.arange(length, dtype=np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (length, dim/2)

    freq = np.broadcast_to(encode(grid_f)[:, None], (grid_f, grid_t, dim // 2))
    time = np.broadcast_to(encode(grid_t)[None, :], (grid_f, grid_t, dim // 2))
    return torch.from_numpy(np.concatenate([freq, time], axis=-1)).float()


class BackboneOutput(NamedTuple):
    tokens: Tensor  # (B, K, D) patch tokens after the final norm, the kept ones in `keep` order
    embedding: Tensor  # (B, D) mean of the cls and distillation tokens after the final norm (AST's pooler_output)
    hidden: Tensor  # (B, 2 + K, D) cls, distillation, patch tokens (AST's last_hidden_state)


class PatchEmbedding(nn.Module):
    """Conv2d over the (mels x frames) image; the stride may be smaller than the kernel (overlapping AST checkpoints)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size,
                                    stride=(config.frequency_stride, config.time_stride))

    def forward(self, features: Tensor) -> Tensor:
        """(B, frames, mels) -> (B, grid_f, grid_t, D)."""
        if self.projection.stride == (self.patch_size, self.patch_size):
            # Non-overlapping patches: the same convolution as one matmul, which is faster on CPUs.
            grid_f = features.shape[2] // self.patch_size
            weight = rearrange(self.projection.weight, "d 1 pf pt -> d (pf pt)")
            tokens = F.linear(patchify(features[..., : grid_f * self.patch_size], self.patch_size), weight,
                              self.projection.bias)
            return rearrange(tokens, "b (f t) d -> b f t d", f=grid_f)
        image = rearrange(features, "b t f -> b 1 f t")
        return rearrange(self.projection(image), "b d f t -> b f t d")

    def patches(self, features: Tensor) -> Tensor:
        """(B, frames, mels) -> (B, N, pf*pt): the patch each token projects, overlapping or not, in token order
        (`patchify` for non-overlapping ones)."""
        patches = F.unfold(rearrange(features, "b t f -> b 1 f t"), self.patch_size, stride=self.projection.stride)
        return rearrange(patches, "b c n -> b n c")

    def image(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N, pf*pt) patches in token order with grid (freq patches, time patches) -> (B, frames, mels) features
        they cover, overlaps averaged: the inverse of `patches` (`unpatchify` for non-overlapping ones)."""
        stride = self.projection.stride
        size = tuple((count - 1) * step + self.patch_size for count, step in zip(grid, stride))  # (mels, frames)
        fold = dict(output_size=size, kernel_size=self.patch_size, stride=stride)
        summed = F.fold(rearrange(patches, "b n c -> b c n"), **fold)
        counts = F.fold(torch.ones_like(patches[:1]).transpose(1, 2), **fold)
        return rearrange(summed / counts, "b 1 f t -> b t f")

    def kept(self, features: Tensor, keep: Tensor) -> Tensor:
        """(B, frames, mels), keep (B, K) frequency-major token indices -> (B, K, D), the same tokens as `forward`
        gives at those indices, projecting only the kept patches (patchout and masking then skip the others' cost)."""
        patches = self.patches(features).transpose(1, 2)  # (B, pf*pt, N), as unfold lays it out
        patches = torch.gather(patches, 2, repeat(keep, "b k -> b c k", c=patches.shape[1]))  # (B, pf*pt, K)
        weight = rearrange(self.projection.weight, "d 1 pf pt -> d (pf pt)")
        return F.linear(rearrange(patches, "b c k -> b k c"), weight, self.projection.bias)


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        # Split along the projection's own (three) axis: backward then stacks the three gradients straight into
        # the (b, n, three*h*d) layout the projection needs, one copy instead of a stack and a permuted copy.
        qkv = rearrange(self.qkv(x), "b n (three h d) -> b n three h d", three=3, h=self.num_heads)
        q, k, v = (rearrange(t, "b n h d -> b h n d") for t in qkv.unbind(dim=2))
        x = attend(q, k, v, dropout=self.dropout if self.training else 0.0)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


def attend(q: Tensor, k: Tensor, v: Tensor, *, dropout: float) -> Tensor:
    """Softmax attention over (B, heads, N, head_dim); bf16 on a CPU as three plain ops, else the fused kernel.

    torch 2.11's fused CPU kernels are slow in bf16: flash attention runs 1.4-2.3x slower than in fp32 over
    forward+backward, and the math backend upcasts to fp32. Plain bf16 matmuls with a bf16 softmax (which
    accumulates in fp32) run 1.5-2.3x faster than fp32 flash attention at the backbone's and MAE decoder's shapes
    (measured on an AVX512-BF16 EPYC). The scores are rounded to bf16, as in transformers' eager attention under
    autocast; fp32 inputs, and GPUs, keep `scaled_dot_product_attention`.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1)
        return F.dropout(weights, dropout) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(config.hidden_size, config.intermediate_size), act=nn.GELU(),
                                             fc2=nn.Linear(config.intermediate_size, config.hidden_size)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """Log-mel features (B, frames, mels) -> BackboneOutput; see the module docstring."""

    no_weight_decay = ("cls_token", "dist_token", "token_position", "grid_position")  # read by param_groups

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        grid_f, grid_t = config.grid(config.max_frames)
        self.patch_embed = PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.token_position = nn.Parameter(torch.zeros(2, config.hidden_size))  # positions of cls and dist
        self.grid_position = nn.Parameter(sincos_grid(grid_f, grid_t, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(init_weights)
        nn.init.xavier_uniform_(rearrange(self.patch_embed.projection.weight, "d 1 pf pt -> d (pf pt)"))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.dist_token, std=0.02)

    def grid(self, frames: int) -> tuple[int, int]:
        """(freq patches, time patches) for an input of `frames` frames."""
        return self.config.grid(frames)

    def forward(self, features: Tensor, *, keep: Tensor | None = None) -> BackboneOutput:
        """features (B, frames, mels); keep (B, K) indices into the frequency-major patch grid, or None for all."""
        batch, frames, mels = features.shape
        if mels != self.config.num_mel_bins or not self.config.patch_size <= frames <= self.config.max_frames:
            raise ValueError(f"expected features (batch, {self.config.patch_size}..{self.config.max_frames} frames, "
                             f"{self.config.num_mel_bins} mels), got {tuple(features.shape)}")
        if keep is None:
            x = self.patch_embed(features)
            x = rearrange(x + self.grid_position[:, : x.shape[2]], "b f t d -> b (f t) d")
        else:
            positions = rearrange(self.grid_position[:, : self.grid(frames)[1]], "f t d -> (f t) d")
            # A gather per clip: its backward sums the clips' position gradients in a fixed order, where indexing
            # with `keep` (eager) and embedding (compiled) add them atomically on CPUs, so runs with patchout or
            # masking differed from one another under one seed.
            positions = torch.gather(repeat(positions, "n d -> b n d", b=batch), 1,
                                     repeat(keep, "b k -> b k d", d=positions.shape[-1]))  # (B, K, D)
            x = self.patch_embed.kept(features, keep) + positions
        special = torch.cat([self.cls_token, self.dist_token], dim=1) + self.token_position
        x = self.dropout(torch.cat([special.expand(batch, -1, -1), x], dim=1))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return BackboneOutput(tokens=x[:, 2:], embedding=(x[:, 0] + x[:, 1]) / 2, hidden=x)


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def param_groups(model: nn.Module, *, backbone: Backbone, lr: float, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups for `model` (which holds `backbone`): no weight decay on biases, norms and the parameters a module
    names in its `no_weight_decay` (learned tokens and positions, as in MAE and timm); with `layer_decay` < 1, block i
    of L gets lr * layer_decay ** (L - i), the embeddings lr * layer_decay ** (L + 1) (BEiT/AudioMAE). Everything
    outside the backbone's embeddings and blocks (final norm, heads, decoders) gets `lr`."""
    num_layers = len(backbone.blocks)
    depths = {}  # parameter id -> 0 embeddings, i + 1 block i
    for name, parameter in backbone.named_parameters():
        block = name.split(".")[1] if name.startswith("blocks.") else None
        if block is not None:
            depths[id(parameter)] = int(block) + 1
        elif not name.startswith("norm."):
            depths[id(parameter)] = 0
    named = {id(getattr(module, name)) for module in model.modules() for name in getattr(module, "no_weight_decay", ())}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        scale = layer_decay ** (num_layers + 1 - depths.get(id(parameter), num_layers + 1))
        exempt = parameter.ndim <= 1 or id(parameter) in named
        groups.setdefault((lr * scale, 0.0 if exempt else weight_decay), []).append(parameter)
    return [{"params": params, "lr": group_lr, "weight_decay": decay}
            for (group_lr, decay), params in sorted(groups.items(), key=lambda item: item[0])]
