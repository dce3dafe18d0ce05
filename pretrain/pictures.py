"""Pictures of what the pretraining objectives see and make, for the tracker: MAE input / masked / reconstruction,
ELECTRA corrupted / truth / detected (`pretrain.train` passes `pictures` to the trainer as its `images` hook)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pretrain.objectives import Pretrainer


@torch.no_grad()
def pictures(model: Pretrainer, batch: dict) -> dict[str, np.ndarray]:
    """PNG-ready pictures of the first clip: MAE input / masked / reconstruction, ELECTRA corrupted / truth / detected."""
    features = model.features(batch["audio"][:2])[:, 0]
    patch = model.backbone.config.patch_size
    grid = model.backbone.grid(features.shape[1])
    drawn, low, high = {}, float(features[0].min()), float(features[0].max())
    if model.objectives.mae.weight > 0:
        mae = model.mae(features, every_patch=True)
        patches = model.backbone.patch_embed.patches(features)
        prediction = mae["prediction"].float()
        if model.objectives.mae.norm_pix_loss:  # back to the input scale with each patch's own mean and std
            prediction = prediction * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
        masked = mae["masked"][..., None]
        shown = patches.masked_fill(masked, low)
        rebuilt = torch.where(masked, prediction, patches)
        image = model.backbone.patch_embed.image
        panels = [features[0, : grid[1] * patch], image(shown, grid)[0], image(rebuilt, grid)[0]]
        drawn["mae/input-masked-reconstruction"] = _stack([_colour(p, low, high) for p in panels])
    if model.objectives.electra.weight > 0:
        electra = model.electra(features)
        corrupted = _colour(electra["corrupted"][0], low, high)
        truth = _overlay(corrupted, electra["labels"][0], grid, patch)
        detected = _overlay(corrupted, electra["logits"][0].argmax(-1), grid, patch)
        drawn["electra/corrupted-truth-detected"] = _stack([corrupted, truth, detected])
    return drawn


def _colour(features: Tensor, low: float, high: float) -> np.ndarray:
    """(T, F) features -> (F, T, 3) uint8 with low frequencies at the bottom (magma colour map)."""
    from matplotlib import colormaps

    scaled = ((features.float().cpu().numpy() - low) / max(high - low, 1e-6)).clip(0, 1)
    return (colormaps["magma"](scaled.T[::-1])[..., :3] * 255).astype(np.uint8)


def _overlay(picture: np.ndarray, labels: Tensor, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Tint shuffled patches cyan and replaced ones green."""
    tint = np.array([[0, 0, 0], [0, 255, 255], [0, 255, 0]], dtype=np.float32)
    cells = labels.reshape(grid).cpu().numpy()  # (grid_f, grid_t), row 0 = lowest frequency
    mask = np.kron(cells[::-1], np.ones((patch, patch), dtype=np.int64))
    out = picture.astype(np.float32)
    marked = mask > 0
    out[marked] = 0.5 * out[marked] + 0.5 * tint[mask[marked]]
    return out.astype(np.uint8)


def _stack(panels: list[np.ndarray]) -> np.ndarray:
    gap = np.full((4, panels[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=0)
