"""Diffusion U-Net: shapes for any latent size, dependence on timestep / covariates, cross-attention.

The U-Net's output conv and residual branches are zero-initialised, so an untrained network returns 0
for every input: a "the output depends on t" check on it would be vacuous (always equal) or wrongly
failing. Tests that probe dependence therefore perturb every weight first (``_perturbed``), which
stands in for a trained network; ``test_untrained_network_predicts_zero`` documents the init itself.
"""

from __future__ import annotations

import pytest
import torch

from synthmri.config import Covariate, UNetParams
from synthmri.diffusion.conditioning import CovariateEncoder
from synthmri.models.blocks import depth_to_space, space_to_depth
from synthmri.models.unet import CrossAttention, DiffusionUNet, timestep_embedding

EMB = 32


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def _perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _unet(spatial_dims=3, channels=(16, 32), attention=(False, True), cross_attention=False, **kw) -> DiffusionUNet:
    return DiffusionUNet(
        spatial_dims,
        4,
        list(channels),
        list(attention),
        num_res_blocks=1,
        num_heads=2,
        norm_groups=8,
        emb_dim=EMB,
        cross_attention=cross_attention,
        **kw,
    )


def test_untrained_network_predicts_zero():
    model = _unet().eval()
    out = model(torch.randn(2, 4, 8, 8, 8), torch.tensor([3, 700]), torch.randn(2, EMB))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "spatial_dims,shape,channels,attention,cross",
    [
        (3, (4, 8, 8, 8), (16, 32), (False, True), False),
        (3, (4, 7, 9, 7), (16, 32), (True, True), True),
        (3, (4, 5, 6, 7), (16, 32, 32), (False, False, True), False),
        (3, (4, 3, 3, 3), (16, 32, 32), (False, True, True), True),
        (2, (4, 8, 8), (16, 32), (False, True), True),
        (2, (4, 9, 7), (16, 32, 32), (True, False, False), False),
    ],
)
def test_output_shape_equals_input_shape(spatial_dims, shape, channels, attention, cross):
    model = _perturbed(_unet(spatial_dims, channels, attention, cross))
    model.train()
    x = torch.randn(2, *shape, requires_grad=True)
    out = model(x, torch.tensor([1, 999]), torch.randn(2, EMB), torch.randn(2, 3, EMB))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().max() > 0
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_timestep_changes_output_and_scalar_broadcasts():
    model = _perturbed(_unet())
    x, emb = torch.randn(2, 4, 8, 8, 8), torch.randn(2, EMB)
    early, late = model(x, torch.tensor([10, 10]), emb), model(x, torch.tensor([900, 900]), emb)
    assert (early - late).abs().max() > 1e-3
    assert torch.equal(model(x, 10, emb), early)
    assert torch.equal(model(x, torch.tensor(10), emb), early)


def test_covariates_change_output():
    covs = [
        Covariate(name="age", kind="continuous", range=(18, 100)),
        Covariate(name="sex", kind="categorical", levels=["F", "M"]),
    ]
    encoder = _perturbed(CovariateEncoder(covs, EMB), seed=1)
    model = _perturbed(_unet())
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    outs = {}
    for name, row in {
        "F": {"age": 40, "sex": "F"},
        "M": {"age": 40, "sex": "M"},
        "old": {"age": 90, "sex": "F"},
        "null": {},
    }.items():
        emb, tokens = encoder(encoder.encode_values([row]))
        outs[name] = model(x, t, emb, tokens)
    assert (outs["F"] - outs["M"]).abs().max() > 1e-3
    assert (outs["F"] - outs["old"]).abs().max() > 1e-3
    assert (outs["F"] - outs["null"]).abs().max() > 1e-3


def test_covariates_matter_after_two_training_steps_from_zero_init():
    """The unperturbed version. After one step only the (zero-init) output conv has moved: the
    residual branches, where the embedding enters, got zero gradient through it. The second step
    moves them, and from then on the output depends on the condition."""
    torch.manual_seed(0)
    model = _unet()
    emb_a, emb_b = torch.randn(1, EMB), torch.randn(1, EMB)
    x, target = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(x[:1], 100, emb_a), model(x[:1], 100, emb_b))
        assert same, f"zero-init network depends on the condition before step {step + 1}"
        model.train()
        opt.zero_grad()
        (model(x, torch.tensor([100, 100]), torch.cat([emb_a, emb_b])) - target).square().mean().backward()
        opt.step()
    model.eval()
    xa = x[:1]
    assert (model(xa, 100, emb_a) - model(xa, 100, emb_b)).abs().max() > 1e-6


def test_cross_attention_reads_tokens_only_when_enabled():
    x, t, emb = torch.randn(2, 4, 8, 8, 8), torch.tensor([5, 5]), torch.randn(2, EMB)
    tokens_a, tokens_b = torch.randn(2, 3, EMB), torch.randn(2, 3, EMB)
    with_ca = _perturbed(_unet(cross_attention=True))
    assert (with_ca(x, t, emb, tokens_a) - with_ca(x, t, emb, tokens_b)).abs().max() > 1e-4
    without = _perturbed(_unet(cross_attention=False))
    assert torch.equal(without(x, t, emb, tokens_a), without(x, t, emb, tokens_b))
    assert not any(isinstance(m, CrossAttention) for m in without.modules())
    # no covariates at all (zero tokens): cross-attention is skipped instead of attending to nothing
    assert torch.isfinite(with_ca(x, t, emb, torch.zeros(2, 0, EMB))).all()


def test_activation_checkpointing_gives_same_output_and_gradients():
    plain = _perturbed(_unet(cross_attention=True))
    ckpt = _perturbed(_unet(cross_attention=True, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, emb, tokens = torch.randn(2, 4, 8, 8, 8), torch.randn(2, EMB), torch.randn(2, 2, EMB)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        out = model(x, torch.tensor([3, 300]), emb, tokens)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_from_params_uses_config_and_cond_dim():
    p = UNetParams(channels=[16, 32], attention=[False, True], num_heads=2, norm_groups=8, cross_attention=True)
    model = DiffusionUNet.from_params(p, in_channels=4, cond_dim=48)
    assert model.emb_dim == 48 and model.cross_attention
    assert sum(isinstance(m, CrossAttention) for m in model.modules()) > 0
    out = model(torch.randn(1, 4, 6, 6, 6), 7, torch.randn(1, 48), torch.randn(1, 3, 48))
    assert out.shape == (1, 4, 6, 6, 6)


def test_timestep_embedding_distinguishes_neighbours():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert emb.shape == (3, 16)
    assert (emb[0] - emb[1]).abs().max() > 1e-2 and (emb[1] - emb[2]).abs().max() > 1e-2


def test_space_to_depth_is_pixel_unshuffle_in_2d_and_inverts_in_3d():
    x2 = torch.randn(2, 3, 6, 8)
    assert torch.equal(space_to_depth(x2, 2), torch.nn.functional.pixel_unshuffle(x2, 2))
    assert torch.equal(depth_to_space(space_to_depth(x2, 2), 2), x2)
    x3 = torch.randn(2, 4, 6, 8, 4)
    folded = space_to_depth(x3, 2)
    assert folded.shape == (2, 32, 3, 4, 2)
    assert torch.equal(depth_to_space(folded, 2), x3)
    # one 2x2x2 cube of channel 1 lands, whole and alone, in the 8 channels of channel 1 at its coarse position
    cube = torch.zeros(1, 4, 6, 8, 4)
    cube[0, 1, 2:4, 4:6, 0:2] = torch.arange(1.0, 9.0).view(2, 2, 2)
    folded = space_to_depth(cube, 2)
    assert torch.equal(folded[0, 8:16, 1, 2, 0], torch.arange(1.0, 9.0))
    assert folded.abs().sum() == cube.abs().sum()
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        space_to_depth(torch.randn(1, 4, 5, 8, 4), 2)


def test_patched_unet_keeps_the_latent_shape_and_runs_at_the_coarse_grid():
    fine = _perturbed(_unet(patch_size=2))
    x = torch.randn(2, 4, 12, 16, 8)
    out = fine(x, torch.tensor([1, 500]), torch.randn(2, EMB))
    assert out.shape == x.shape and out.abs().max() > 0
    assert fine.conv_in.in_channels == 32 and fine.out[-1].out_channels == 32
    # the U-Net body sees the folded grid: its first conv output is at half the resolution
    seen = {}
    fine.conv_in.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape[2:])))
    fine(x, 3)
    assert seen["shape"] == (6, 8, 4)
    p = UNetParams(channels=[16, 32], attention=[False, True], num_heads=2, norm_groups=8, patch_size=2)
    assert DiffusionUNet.from_params(p, in_channels=4).patch_size == 2


def test_per_level_residual_blocks_build_a_cheap_full_resolution_level():
    # one count for all levels and the same count per level build the same network (saved models load as before)
    same = _unet(channels=(16, 32), attention=(False, True))
    listed = DiffusionUNet(3, 4, [16, 32], [False, True], num_res_blocks=[1, 1], num_heads=2, emb_dim=EMB)
    assert same.state_dict().keys() == listed.state_dict().keys()
    assert all(
        a.shape == b.shape for a, b in zip(same.state_dict().values(), listed.state_dict().values(), strict=True)
    )

    light = DiffusionUNet(3, 4, [16, 32, 64], [False, False, True], num_res_blocks=[0, 1, 1], num_heads=2, emb_dim=EMB)
    full = DiffusionUNet(3, 4, [16, 32, 64], [False, False, True], num_res_blocks=1, num_heads=2, emb_dim=EMB)

    def full_resolution_blocks(model: DiffusionUNet, x: torch.Tensor) -> int:
        hits = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: hits.append(o.shape[2:] == x.shape[2:]))
            for m in model.modules()
            if m.__class__.__name__ == "ResidualBlock"
        ]
        model(x, 5, torch.randn(1, EMB))
        for h in hooks:
            h.remove()
        return sum(hits)

    x = torch.randn(1, 4, 8, 10, 6)
    # the finest level: no block on the way down, one on the way up (against 1 + 2)
    assert full_resolution_blocks(light, x) == 1 and full_resolution_blocks(full, x) == 3
    model = _perturbed(light).train()
    x.requires_grad_(True)
    out = model(x, torch.tensor([4]), torch.randn(1, EMB))
    assert out.shape == x.shape and out.abs().max() > 0
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    # a level without blocks between two others keeps its input's width on the way down
    middle_empty = DiffusionUNet(3, 4, [16, 32, 64], [False, False, True], num_res_blocks=[1, 0, 1], num_heads=2)
    assert _perturbed(middle_empty)(torch.randn(1, 4, 8, 8, 8), 3).shape == (1, 4, 8, 8, 8)

    p = UNetParams(
        channels=[16, 32, 64], attention=[False, False, True], num_res_blocks=[0, 1, 1], num_heads=2, patch_size=1
    )
    assert full_resolution_blocks(DiffusionUNet.from_params(p, in_channels=4, cond_dim=EMB), x.detach()) == 1
    # one rule for the config and a direct construction: a single count >= 1, or one count >= 0 per level
    for bad in ([0, 1], [1, -1, 1], 0):
        with pytest.raises(ValueError, match="num_res_blocks"):
            UNetParams(channels=[16, 32, 64], attention=[False, False, True], num_res_blocks=bad)
        with pytest.raises(ValueError, match="num_res_blocks"):
            DiffusionUNet(3, 4, [16, 32, 64], [False, False, True], num_res_blocks=bad)


def test_embedding_width_is_set_apart_from_the_finest_level():
    from synthmri.models.loading import build_ldm

    covariates = [Covariate(name="age", kind="continuous", range=[20.0, 90.0])]
    narrow = UNetParams(channels=[16, 32], attention=[False, True], num_heads=2, patch_size=1)
    wide = narrow.model_copy(update={"emb_dim": 128})
    default, widened = build_ldm(narrow, covariates, 4), build_ldm(wide, covariates, 4)
    assert default.unet.emb_dim == 64 and widened.unet.emb_dim == 128
    assert widened.unet.time_mlp[-1].out_features == 128
    # the covariate encoder's width follows the U-Net's, so the two embeddings can be added
    batch = widened.encoder.encode_values([{"age": 40.0}])
    assert widened.encoder(batch)[0].shape == (1, 128)
    out = _perturbed(widened)(torch.randn(1, 4, 6, 6, 6), torch.tensor([9]), batch)
    assert out.shape == (1, 4, 6, 6, 6) and out.abs().max() > 0
