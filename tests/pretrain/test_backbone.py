"""The spectrogram ViT: shapes, token order, visible-patch encoding, variable length, sin-cos positions."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch.nn import functional as F

from pretrain.backbone import Backbone, BackboneConfig, ModelConfig, attend, patchify, unpatchify
from pretrain.frontend import FrontendConfig


def small(**overrides) -> BackboneConfig:
    return BackboneConfig.from_size("tiny", num_layers=2, max_frames=298, **overrides)


@pytest.fixture(scope="module")
def model() -> Backbone:
    torch.manual_seed(0)
    return Backbone(small()).eval()


def test_sizes_and_overrides() -> None:
    assert [(c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size)
            for c in map(BackboneConfig.from_size, ("tiny", "small", "base"))] == [
        (192, 12, 3, 768), (384, 12, 6, 1536), (768, 12, 12, 3072)]
    custom = BackboneConfig.from_size("small", num_layers=4, hidden_size=256, num_heads=8)
    assert (custom.hidden_size, custom.num_layers, custom.num_heads) == (256, 4, 8)
    with pytest.raises(ValueError, match="unknown backbone size"):
        BackboneConfig.from_size("huge")
    with pytest.raises(ValueError, match="divisible"):
        BackboneConfig(hidden_size=100, num_heads=3)


def test_recipe_model_section_sets_patch_size_and_strides() -> None:
    def config(**section) -> BackboneConfig:
        return ModelConfig(size="cpu-2", **section).backbone_config(max_frames=298, frontend=FrontendConfig())

    assert config().grid(298) == (8, 18)
    assert config(frequency_stride=8).grid(298) == (15, 18)  # patches overlap in frequency only
    assert config(patch_size=8).grid(298) == (16, 37)  # non-overlapping 8 x 8 patches
    assert config(time_stride=10).grid(298) == (8, 29)
    with pytest.raises(ValueError, match="stride"):
        config(patch_size=8, frequency_stride=16)


def test_outputs_and_grid(model: Backbone) -> None:
    features = torch.randn(2, 298, 128)
    output = model(features)
    assert model.grid(298) == (8, 18) and model.hidden_size == 192
    assert output.tokens.shape == (2, 144, 192) and output.hidden.shape == (2, 146, 192)
    assert torch.equal(output.tokens, output.hidden[:, 2:])
    assert torch.equal(output.embedding, (output.hidden[:, 0] + output.hidden[:, 1]) / 2)
    with pytest.raises(ValueError, match="frames"):
        model(torch.randn(1, 299, 128))
    with pytest.raises(ValueError, match="mels"):
        model(torch.randn(1, 100, 64))


def test_patchify_order_is_the_token_order(model: Backbone) -> None:
    features = torch.randn(2, 298, 128)
    patches = patchify(features, 16)
    assert patches.shape == (2, 144, 256)
    assert torch.equal(unpatchify(patches, model.grid(298), 16), features[:, :288])
    # token 1 is frequency patch 0, time patch 1 (frequency-major, like AST's Conv2d)
    assert torch.equal(patches[:, 1], rearrange(features[:, 16:32, :16], "b t f -> b (f t)"))
    conv = model.patch_embed.projection
    image_tokens = rearrange(conv(rearrange(features, "b t f -> b 1 f t")), "b d f t -> b (f t) d")
    torch.testing.assert_close(rearrange(model.patch_embed(features), "b f t d -> b (f t) d"), image_tokens,
                               rtol=1e-4, atol=1e-4)


def test_keep_runs_the_encoder_on_the_kept_patches_only(model: Backbone) -> None:
    torch.manual_seed(1)
    features = torch.randn(2, 298, 128)
    full = model(features)
    order = torch.stack([torch.randperm(144) for _ in range(2)])
    permuted = model(features, keep=order)  # attention is permutation-equivariant: same tokens, new order
    torch.testing.assert_close(permuted.tokens, torch.gather(full.tokens, 1, order[..., None].expand(-1, -1, 192)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted.embedding, full.embedding, rtol=1e-4, atol=1e-4)
    visible = model(features, keep=order[:, :36])
    assert visible.tokens.shape == (2, 36, 192) and visible.hidden.shape == (2, 38, 192)
    assert not torch.allclose(visible.embedding, full.embedding, atol=1e-3)  # masked patches are really unseen


def test_kept_overlapping_patches_are_the_tokens_of_the_full_grid() -> None:
    # keep projects only the kept patches (unfold + gather); they must equal the full Conv2d's tokens at those indices,
    # here with patches overlapping in both axes and an input shorter than max_frames (a slice of the position grid)
    torch.manual_seed(2)
    model = Backbone(small(frequency_stride=4, time_stride=8)).eval()
    features = torch.randn(2, 200, 128)
    grid_f, grid_t = model.grid(200)
    full = model(features)
    order = torch.stack([torch.randperm(grid_f * grid_t) for _ in range(2)])
    permuted = model(features, keep=order)
    torch.testing.assert_close(permuted.tokens, torch.gather(full.tokens, 1, order[..., None].expand(-1, -1, 192)),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted.embedding, full.embedding, rtol=1e-4, atol=1e-4)


def test_shorter_inputs_use_the_matching_slice_of_the_position_grid(model: Backbone) -> None:
    features = torch.randn(2, 100, 128)  # 6 time patches
    short = Backbone(BackboneConfig.from_size("tiny", num_layers=2, max_frames=100)).eval()
    state = dict(model.state_dict(), grid_position=model.grid_position[:, :6])
    short.load_state_dict(state)
    torch.testing.assert_close(model(features).hidden, short(features).hidden, rtol=0, atol=1e-6)


def test_positions_start_as_2d_sincos(model: Backbone) -> None:
    fresh = Backbone(small()).grid_position.detach()
    assert fresh.shape == (8, 18, 192)
    half = 96
    # frequency half constant along time, time half constant along frequency; both start at sin 0 / cos 1
    assert torch.equal(fresh[:, :1, :half].expand(-1, 18, -1), fresh[:, :, :half])
    assert torch.equal(fresh[:1, :, half:].expand(8, -1, -1), fresh[:, :, half:])
    assert torch.equal(fresh[0, 0], torch.cat([torch.zeros(48), torch.ones(48)] * 2))
    torch.testing.assert_close(fresh[0, 1, half: half + 1], torch.sin(torch.ones(1)))
    assert model.grid_position.requires_grad  # learned from the sin-cos start, as in AST


def test_cpu_bf16_attention_matches_fp32_attention_forward_and_backward() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 146, 64, requires_grad=True) for _ in range(3))
    output = F.scaled_dot_product_attention(q, k, v)
    upstream = torch.randn_like(output)
    expected = torch.autograd.grad(output, (q, k, v), upstream)
    low = [tensor.detach().bfloat16().requires_grad_() for tensor in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attended = attend(*low, dropout=0.0)
    assert attended.dtype == torch.bfloat16
    torch.testing.assert_close(attended.float(), output.detach(), atol=0.02, rtol=0.02)
    grads = torch.autograd.grad(attended, low, upstream.bfloat16())
    for grad, reference in zip(grads, expected):  # bf16 rounding only: a few parts in a thousand of the gradient
        assert (grad.float() - reference).norm() < 0.02 * reference.norm()


def test_trains_in_bf16_autocast_with_dropout() -> None:
    torch.manual_seed(0)
    model = Backbone(small(dropout=0.1)).train()
    features = torch.randn(2, 160, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(features, keep=torch.tensor([[0, 3, 5], [1, 2, 4]]))
    output.embedding.float().square().mean().backward()
    assert output.tokens.shape == (2, 3, 192)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradients_with_keep_are_the_same_on_every_run(compiled: bool) -> None:
    # Patchout and masking draw a different subset per clip, so clips share position indices; their gradients must
    # be summed in a fixed order, or one seed gives a different model on every run (it did: indexing the position
    # table added them atomically on CPUs, eager and compiled).
    torch.manual_seed(3)
    model = Backbone(small(frequency_stride=4))
    features = torch.randn(16, 298, 128)
    grid_f, grid_t = model.grid(298)
    keep = torch.stack([torch.randperm(grid_f * grid_t)[: grid_f * grid_t // 4] for _ in range(16)])
    def loss() -> torch.Tensor:
        return model(features, keep=keep).tokens.square().mean()

    step = torch.compile(loss) if compiled else loss
    runs = []
    for _ in range(4):
        model.zero_grad()
        step().backward()
        runs.append(model.grid_position.grad.clone())
    assert all(torch.equal(runs[0], run) for run in runs[1:])
