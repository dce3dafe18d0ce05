"""How much of the backbone fine-tuning may change: probe, full (layer-wise lr decay), bottleneck adapters, or LoRA.

- `probe`: the backbone is frozen; only the head learns.
- `full`: everything learns; block i of L gets lr * decay ** (L + 1 - i) so early layers move least (BEiT/AudioMAE).
- `adapter`: the backbone is frozen; every block gets a small bottleneck MLP (down, GELU, up; the up projection starts
  at zero so training starts from the pretrained function), applied to the block's output (`sequential`, Houlsby/Pfeiffer)
  or beside the block on its input (`parallel`, He et al. / AdaptFormer). Adapters are attached with forward hooks, so the
  backbone's own parameter names (and its Hub export) are untouched.
- `lora`: peft LoRA on every Linear of every block (attention qkv/proj and the MLP), merged back into plain Linear
  layers for export so the exported backbone is an ordinary AST.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Mode = Literal["probe", "full", "adapter", "lora"]
MODES = get_args(Mode)


@dataclass
class AdaptConfig:
    """Adaptation mode and its knobs (see the module docstring)."""

    mode: Mode = "full"
    layer_decay: float = 0.75  # full: lr multiplier per block counted from the top
    warmup_head_steps: int = 0  # first steps train only the head; backbone, adapters and LoRA wait
    adapter_dim: int = 32
    adapter_style: Literal["sequential", "parallel"] = "sequential"
    adapter_scale: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


class Adapter(nn.Module):
    """Bottleneck MLP whose output is added to the residual stream; zero-initialised up projection."""

    def __init__(self, *, dim: int, bottleneck: int, scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(nn.functional.gelu(self.down(x))) * self.scale


def attach_adapters(backbone: nn.Module, config: AdaptConfig) -> nn.ModuleList:
    """One adapter per block, run by a forward hook on that block; returns the adapters (owned by the caller)."""
    blocks = backbone.blocks
    adapters = nn.ModuleList(
        Adapter(dim=backbone.hidden_size, bottleneck=config.adapter_dim, scale=config.adapter_scale) for _ in blocks
    )
    for block, adapter in zip(blocks, adapters):
        if config.adapter_style == "sequential":
            block.register_forward_hook(lambda module, args, output, adapter=adapter: output + adapter(output))
        elif config.adapter_style == "parallel":
            block.register_forward_hook(lambda module, args, output, adapter=adapter: output + adapter(args[0]))
        else:
            raise ValueError(f"adapter_style must be sequential or parallel; got {config.adapter_style!r}")
    return adapters


def lora_targets(backbone: nn.Module) -> list[str]:
    """Names of every Linear inside the blocks: attention qkv/proj and both MLP projections."""
    return [f"blocks.{index}.{inner}" for index, block in enumerate(backbone.blocks)
            for inner, module in block.named_modules() if isinstance(module, nn.Linear)]


def attach_lora(backbone: nn.Module, config: AdaptConfig) -> None:
    """Inject peft LoRA layers in place; peft freezes every non-LoRA backbone parameter."""
    from peft import LoraConfig, inject_adapter_in_model  # here: importing peft takes seconds that other modes skip

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(backbone), bias="none")
    inject_adapter_in_model(lora, backbone)


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` with any LoRA folded into plain Linear weights (the original keeps training)."""
    backbone = copy.deepcopy(backbone)
    if any(".lora_" in name for name, _ in backbone.named_parameters()):  # peft names its weights lora_A / lora_B
        from peft.tuners.lora import LoraLayer  # here: importing peft takes seconds that the other modes skip

        for name, module in list(backbone.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child,
                        module.get_base_layer())
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    return backbone


def prepare(backbone: nn.Module, config: AdaptConfig) -> nn.ModuleList | None:
    """Freeze/attach according to `config.mode`; returns bottleneck adapters when there are any."""
    if config.mode not in MODES:
        raise ValueError(f"adapt.mode must be one of {', '.join(MODES)}; got {config.mode!r}")
    if config.mode in ("probe", "adapter"):
        backbone.requires_grad_(False)
    if config.mode == "adapter":
        return attach_adapters(backbone, config)
    if config.mode == "lora":
        attach_lora(backbone, config)
    return None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the gradient by `scale`.

    Head-only warm-up uses scale 0: every backbone parameter still receives a (zero) gradient, so DDP's reducer sees
    the same parameters every step and Adam's moments stay at zero, leaving the backbone where it was.
    """
    return _ScaleGrad.apply(x, scale)
