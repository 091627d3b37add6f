"""VQ-GAN networks: blocks, quantizer, autoencoder, discriminators (tiny sizes, CPU)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthmri.config import DiscriminatorParams, QuantizerParams, VQGANModelParams
from synthmri.models.blocks import AttentionBlock, Downsample, ResidualBlock, Upsample
from synthmri.models.discriminator import PatchDiscriminator, SliceDiscriminator
from synthmri.models.quantizer import ResidualVectorQuantizer, VectorQuantizer
from synthmri.models.slicing import slice_indices, take_slices
from synthmri.models.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def tiny_vqgan(factor: int = 4, codebook_size: int = 32, **quantizer) -> VQGAN:
    channels = [8, 16, 16] if factor == 4 else [8, 8, 16, 16]
    model = VQGANModelParams(channels=channels, downsample_factor=factor, latent_channels=4, norm_groups=4)
    return VQGAN.from_params(model, QuantizerParams(codebook_size=codebook_size, **quantizer))


def smooth_volumes(n: int, size: int = 16, grid: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(
        torch.randn(n, 1, grid, grid, grid, generator=g), size=(size,) * 3, mode="trilinear", align_corners=True
    )
    return x / x.abs().amax()


def randomize_zero_inits(module: nn.Module) -> None:
    """Zero-initialised output layers hide a block's branch; give them weights to test the branch."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.1)


# -- blocks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_blocks_shapes_in_2d_and_3d(dims):
    x = torch.randn(2, 8, *(8,) * dims)
    assert ResidualBlock(dims, 8, 16, norm_groups=4)(x).shape == (2, 16, *(8,) * dims)
    assert Downsample(dims, 8)(x).shape == (2, 8, *(4,) * dims)
    assert Upsample(dims, 8, 4)(x).shape == (2, 4, *(16,) * dims)
    assert AttentionBlock(8, num_heads=2, norm_groups=4)(x).shape == x.shape


def test_residual_block_starts_as_identity_and_uses_the_embedding():
    x, emb = torch.randn(2, 8, 6, 6, 6), torch.randn(2, 5)
    block = ResidualBlock(3, 8, 8, norm_groups=4, emb_channels=5)
    assert torch.equal(block(x, emb), x)  # zero-initialised output conv
    randomize_zero_inits(block)
    assert not torch.allclose(block(x, emb), block(x, emb + 1.0))  # scale-shift conditioning acts
    with pytest.raises(ValueError, match="embedding"):
        block(x)


def test_attention_mixes_all_positions():
    attn = AttentionBlock(8, num_heads=2, norm_groups=4)
    randomize_zero_inits(attn)
    x = torch.randn(1, 8, 4, 4, 4)
    y = x.clone()
    y[..., 0, 0, 0] += 5.0
    far = (..., 3, 3, 3)
    assert not torch.allclose(attn(x)[far], attn(y)[far])  # a change in one corner reaches the other


# -- vector quantizer --------------------------------------------------------------------------------


def codebook_quantizer(embedding: torch.Tensor, **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(embedding.shape[0], embedding.shape[1], **kwargs)
    q.embedding.copy_(embedding)
    q.embed_sum.copy_(embedding)
    q.initialized.fill_(True)
    return q


def test_straight_through_gradient_is_identity():
    q = codebook_quantizer(torch.randn(16, 4)).train()
    codebook = q.embedding.clone()
    z = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    out = q(z)
    w = torch.randn_like(z)
    (out.quantized * w).sum().backward()
    assert torch.allclose(z.grad, w)
    assert out.indices.shape == (2, 3, 3, 3)
    # forward value: the nearest code of the codebook before this step's EMA update
    assert torch.allclose(out.quantized, F.embedding(out.indices, codebook).movedim(-1, 1), atol=1e-6)
    assert torch.equal(out.indices, torch.cdist(z.detach().movedim(1, -1), codebook).argmin(-1))


def test_ema_moves_used_code_toward_inputs_and_unused_sizes_decay():
    far = torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0], [50.0, -50.0]])
    q = codebook_quantizer(far, decay=0.9, dead_code_threshold=0.0).train()
    z = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1) + 0.1 * torch.randn(1, 2, 4, 4, 4)
    flat = z.movedim(1, -1).reshape(-1, 2)
    q(z)
    # hand-computed EMA: sizes 0.9 * 1 + 0.1 * count, sums 0.9 * e + 0.1 * sum of assigned inputs
    assert torch.allclose(q.cluster_size, torch.tensor([0.9 + 0.1 * 64, 0.9, 0.9, 0.9]))
    assert torch.allclose(q.embed_sum[0], 0.1 * flat.sum(0))
    target = flat.mean(0)
    dist = [(q.embedding[0] - target).norm().item()]
    for step in range(1, 30):
        q(z)
        dist.append((q.embedding[0] - target).norm().item())
        assert torch.allclose(q.cluster_size[1:], torch.full((3,), 0.9 ** (step + 1)))
    assert dist[-1] < 0.05 * dist[0] and all(b <= a for a, b in zip(dist, dist[1:]))


def test_eval_mode_and_encode_indices_do_not_change_the_codebook():
    q = VectorQuantizer(8, 3).train()
    z = torch.randn(2, 3, 4, 4, 4)
    q(z)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.encode_indices(z)
    q.eval()(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_first_training_batch_initialises_codebook_from_encoder_outputs():
    q = VectorQuantizer(8, 3, dead_code_threshold=0.0)
    q.embedding.mul_(100.0)  # far from the data: without data init almost no code would be used
    z = torch.randn(1, 3, 4, 4, 4)
    assert q.eval()(z).stats["usage"] <= 2 / 8
    out = q.train()(z)
    assert bool(q.initialized) and out.stats["usage"] >= 0.75


def test_dead_code_restart_revives_unused_codes():
    z = torch.randn(2, 4, 4, 4, 4)
    flat = z.movedim(1, -1).reshape(-1, 4)
    embedding = torch.full((16, 4), 100.0)
    embedding[0] = flat.mean(0)  # only code 0 is reachable
    q = codebook_quantizer(embedding, dead_code_threshold=1.0)
    assert q.eval()(z).stats["usage"] == pytest.approx(1 / 16)
    q.train()(z)
    assert (q.embedding[1:, None, :] == flat[None]).all(-1).any(1).all()  # each dead code = an encoder output
    assert q.cluster_size[1:].eq(1.0).all()  # and gets one step of grace
    assert q.eval()(z).stats["usage"] >= 0.75


def test_dead_code_restart_disabled_at_threshold_zero():
    embedding = torch.full((4, 2), 100.0)
    embedding[0] = 0.0
    q = codebook_quantizer(embedding, dead_code_threshold=0.0).train()
    q(torch.randn(1, 2, 4, 4, 4))
    assert torch.allclose(q.embedding[1:], embedding[1:], atol=1e-2)  # not moved to the data


def test_state_dict_round_trip_preserves_codebook_and_encoding():
    model = tiny_vqgan().train()
    x = smooth_volumes(2)
    for _ in range(3):
        model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = tiny_vqgan()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("embedding", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(getattr(restored.quantizer, name), getattr(model.quantizer, name)), name
    assert torch.equal(restored.eval().encode(x), model.eval().encode(x))


# -- autoencoder ---------------------------------------------------------------------------------------


def test_residual_stages_quantize_what_the_first_codebook_leaves():
    """Each residual stage lowers the quantization error on data it was trained on (the point of more bits per
    position); the training forward's value, ``encode_indices`` and ``decode_indices`` agree; the gradient to the
    encoder output is straight-through; and the stage-1 codebook learns the residuals, not the data."""
    torch.manual_seed(0)
    z = torch.randn(4, 3, 6, 6, 6) * 2.0
    rvq = ResidualVectorQuantizer(3, 16, 3, decay=0.8).train()
    for _ in range(30):
        rvq(z)
    rvq.eval()
    out = rvq(z)
    ids = rvq.encode_indices(z)
    assert ids.shape == (4, 3, 6, 6, 6) and torch.equal(ids, out.indices)
    assert torch.allclose(rvq.decode_indices(ids), out.quantized, atol=1e-5)
    partial = [sum(stage.decode_indices(ids[:, i]) for i, stage in enumerate(rvq.stages[: k + 1])) for k in range(3)]
    errors = [(z - codes).pow(2).mean() for codes in partial]
    assert errors[0] > 2 * errors[1] and errors[1] > 2 * errors[2]
    first_alone = VectorQuantizer(16, 3, decay=0.8).train()
    for _ in range(30):
        first_alone(z)
    assert errors[2] < 0.2 * (z - first_alone.eval()(z).quantized).pow(2).mean()  # beats one codebook of the same size
    assert rvq.stages[1].embedding.norm(dim=1).mean() < 0.6 * rvq.stages[0].embedding.norm(dim=1).mean()
    zg = z.clone().requires_grad_(True)
    w = torch.randn_like(z)
    (rvq.train()(zg).quantized * w).sum().backward()
    assert torch.allclose(zg.grad, w)
    assert set(out.stats) == {"perplexity", "usage", "alive", "perplexity_last"}
    with pytest.raises(ValueError, match="2 levels"):
        ResidualVectorQuantizer(1, 16, 3)


def test_vqgan_with_residual_stages_keeps_more_of_its_input_and_round_trips():
    """``quantizer.levels`` builds residual stages: the codes carry ``levels`` ids per position, ``encode`` is their
    summed vectors, and the state dict round-trips through the model loader's path (config -> from_params)."""
    one, three = tiny_vqgan(codebook_size=8), tiny_vqgan(codebook_size=8, levels=3)
    three.encoder.load_state_dict(one.encoder.state_dict())
    x = smooth_volumes(2)
    for model in (one.train(), three.train()):
        for _ in range(10):
            model(x)
    with torch.no_grad():
        pre = one.encode_pre_quant(x)
        err_one = (one.eval().encode(x) - pre).pow(2).mean()
        err_three = (three.eval().encode(x) - pre).pow(2).mean()
    assert err_three < 0.5 * err_one
    ids = three.encode_indices(x)
    assert ids.shape == (2, 3, 4, 4, 4)
    assert torch.equal(three.decode_indices(ids), three.decode(three.encode(x)))
    buffer = io.BytesIO()
    torch.save(three.state_dict(), buffer)
    buffer.seek(0)
    again = tiny_vqgan(codebook_size=8, levels=3)
    again.load_state_dict(torch.load(buffer))
    assert torch.equal(again.eval().encode(x), three.encode(x))


@pytest.mark.parametrize("factor", [4, 8])
def test_vqgan_shapes_and_downsampling_factor(factor):
    model = tiny_vqgan(factor)
    x = torch.randn(2, 1, 16, 16, 24)
    recon, vq_loss, stats = model(x)
    assert recon.shape == x.shape and vq_loss.ndim == 0
    assert set(stats) == {"perplexity", "usage", "alive"}
    z = model.encode(x)
    assert z.shape == (2, 4, 16 // factor, 16 // factor, 24 // factor)
    assert model.encode_indices(x).shape == (2, 16 // factor, 16 // factor, 24 // factor)
    assert model.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 16, 16, 12 if factor == 8 else 10))


def test_encode_is_deterministic_codes():
    model = tiny_vqgan().train()
    x = smooth_volumes(2)
    model(x)  # initialise the codebook
    z1, z2 = model.encode(x), model.encode(x)
    assert torch.equal(z1, z2)
    vectors = z1.movedim(1, -1).reshape(-1, 4)
    assert (vectors[:, None, :] == model.quantizer.embedding[None]).all(-1).any(1).all()  # codes, exactly
    assert torch.equal(model.decode_indices(model.encode_indices(x)), model.decode(z1))
    assert torch.equal(model.decode(z1 + 1e-4, quantize=True), model.decode(z1))


def test_gradient_reaches_encoder_through_quantizer():
    model = tiny_vqgan().train()
    recon, vq_loss, _ = model(smooth_volumes(1))
    (recon - smooth_volumes(1, seed=1)).abs().mean().backward()  # no vq_loss: only the straight-through path
    first_conv = model.encoder.layers[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_last_layer_weight_is_decoder_output_conv():
    model = tiny_vqgan()
    w = model.last_layer_weight
    assert isinstance(w, nn.Parameter) and w.shape[0] == 1  # one output channel
    assert w is list(model.decoder.parameters())[-2]


def test_overfitting_a_few_volumes_drives_reconstruction_error_down():
    params = VQGANModelParams(channels=[4, 8, 16], downsample_factor=4, latent_channels=4, norm_groups=4)
    model = VQGAN.from_params(params, QuantizerParams(codebook_size=32))
    x = smooth_volumes(2)
    with torch.no_grad():
        before = (model.eval()(x)[0] - x).abs().mean().item()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        recon, vq_loss, _ = model(x)
        loss = (recon - x).abs().mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (model.eval()(x)[0] - x).abs().mean().item()
    assert after < before / 5, (before, after)  # ~10x on this seed


# -- discriminators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_patch_discriminator_shapes_and_no_batchnorm(dims):
    disc = PatchDiscriminator(dims, in_channels=1, channels=8, layers=3)
    logits, feats = disc(torch.randn(2, 1, *(16,) * dims))
    assert logits.shape == (2, 1, *(2,) * dims)
    assert len(feats) == 4 and feats[0].shape == (2, 8, *(8,) * dims)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())


def test_slice_discriminator_judges_all_three_axes():
    disc = SliceDiscriminator.from_params(DiscriminatorParams(channels=8, layers=2), slices_per_axis=2)
    x = torch.randn(2, 1, 16, 20, 24)
    idx = disc.sample_indices(x.shape[2:], torch.Generator().manual_seed(0))
    logits, feats = disc(x, idx)
    assert logits.shape[0] == 2 and len(feats) == 3 * 3  # 3 hidden layers per axis
    # the first feature map of each axis has that axis's in-plane shape (halved by the first conv)
    assert [tuple(feats[3 * a].shape[2:]) for a in range(3)] == [(10, 12), (8, 12), (8, 10)]
    assert torch.equal(disc(x, idx)[0], logits)  # same slices, same judgement


def test_slices_cover_each_axis_at_the_requested_positions():
    x = torch.arange(2 * 6 * 7 * 8, dtype=torch.float32).view(2, 1, 6, 7, 8)
    idx = slice_indices(x.shape[2:], 2)
    a0, a1, a2 = take_slices(x, idx)
    assert a0.shape == (4, 1, 7, 8) and a1.shape == (4, 1, 6, 8) and a2.shape == (4, 1, 6, 7)
    assert torch.equal(a1[1], x[0, :, :, idx[1][1], :]) and torch.equal(a2[2], x[1, :, :, :, idx[2][0]])
    assert slice_indices((9, 9, 9), 1)[0].item() == 4  # one slice = the mid-slice
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(
        torch.equal(a, b) for a, b in zip(slice_indices((32,) * 3, 4, True, g1), slice_indices((32,) * 3, 4, True, g2))
    )


# -- DDP: EMA statistics are all-reduced, restarts are broadcast ---------------------------------------


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        codebook, z = torch.randn(8, 3), torch.randn(2, 3, 4, 4, 4)  # same on both ranks (same seed)
        q = codebook_quantizer(codebook, dead_code_threshold=0.0).train()
        q(z[rank : rank + 1])  # each rank sees half of the batch
        r = codebook_quantizer(codebook, dead_code_threshold=1.0).train()
        torch.manual_seed(rank)  # ranks sample different restart candidates
        r(z[rank : rank + 1] + 100.0)  # all codes dead
        torch.save({"ema": q.state_dict(), "restart": r.embedding}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_ema_statistics_and_broadcasts_restarts(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    codebook, z = torch.randn(8, 3), torch.randn(2, 3, 4, 4, 4)
    single = codebook_quantizer(codebook, dead_code_threshold=0.0).train()
    single(z)  # one process seeing the whole batch
    for res in results:
        for name, value in single.state_dict().items():
            assert torch.allclose(res["ema"][name].float(), value.float(), atol=1e-5), name
    assert torch.equal(results[0]["restart"], results[1]["restart"])  # codebooks stay in sync
