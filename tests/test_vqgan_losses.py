"""VQ-GAN losses: adversarial terms, adaptive weight, 2.5D LPIPS and its weight policy."""

from __future__ import annotations

import warnings

import lpips
import pytest
import torch

from synthmri.config import VQGANLossParams
from synthmri.losses import (
    LPIPS25D,
    RandomBackboneWarning,
    adaptive_gan_weight,
    build_lpips,
    disc_factor,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
)
from synthmri.losses.perceptual import hub_weights_path
from synthmri.models.slicing import slice_indices

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache without any ImageNet weights."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture(scope="module")
def lpips25d():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        net, _ = build_lpips("alex")
    return LPIPS25D(net, slices_per_axis=2)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A stand-in for ImageNet weights: a random lpips AlexNet backbone saved to disk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        backbone = lpips.pretrained_networks.alexnet(requires_grad=False, pretrained=False)
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save(backbone.state_dict(), path)
    return path, backbone.state_dict()


def volume(seed: int = 0, shape=(1, 1, 16, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(
        torch.randn(shape[0], 1, 4, 4, 4, generator=g), size=shape[2:], mode="trilinear", align_corners=True
    )
    return (x / x.abs().amax()).clamp(-1, 1)


# -- adversarial ------------------------------------------------------------------------------------


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # confident: no push
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_feature_matching_is_zero_for_identical_and_grows_with_perturbation():
    feats = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8, 4, 4, 4)]
    assert feature_matching_loss(feats, [f.clone() for f in feats]).item() == 0.0
    noise = [torch.randn_like(f) for f in feats]
    losses = [feature_matching_loss(feats, [f + a * n for f, n in zip(feats, noise)]).item() for a in (0.1, 0.5, 2.0)]
    assert 0 < losses[0] < losses[1] < losses[2]
    real = [f.clone().requires_grad_() for f in feats]
    fake = [(f + 1).requires_grad_() for f in feats]
    feature_matching_loss(real, fake).backward()
    assert real[0].grad is None and fake[0].grad is not None  # the real side is detached
    with pytest.raises(ValueError):
        feature_matching_loss(feats, feats[:1])


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    rec_loss = (w * a).sum()  # d/dw = a
    gan_loss = 3.0 * (w * b).sum() + (w**2).sum()  # d/dw = 3b + 2w
    weight = adaptive_gan_weight(rec_loss, gan_loss, w)
    expected = a.norm() / ((3.0 * b + 2 * w.detach()).norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (rec_loss + weight * gan_loss).backward()  # graphs were retained for the real backward pass
    no_gan_grad = adaptive_gan_weight((w * a).sum(), (w.detach() * b).sum() + 0 * w.sum(), w, max_weight=50.0)
    assert no_gan_grad.item() == 50.0  # clamped


def test_disc_factor_switches_on_at_start_step():
    assert [disc_factor(s, 3) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert disc_factor(5, 0, value=0.5) == 0.5


# -- 2.5D LPIPS -------------------------------------------------------------------------------------


def test_lpips25d_zero_for_identical_and_grows_with_noise(lpips25d):
    x = volume()
    assert lpips25d(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    noise = torch.randn_like(x)
    values = [lpips25d(x, x + a * noise).item() for a in (0.05, 0.2, 0.8)]
    assert 0 < values[0] < values[1] < values[2]


def test_lpips25d_slices_cover_all_three_axes(lpips25d):
    x = volume(shape=(1, 1, 16, 20, 24))
    axis0 = slice_indices(x.shape[2:], lpips25d.slices_per_axis)[0].tolist()
    plane = next(i for i in range(6, 16) if i not in axis0)
    y = x.clone()
    y[:, :, plane] += 0.5  # a change confined to one axis-0 plane that no axis-0 slice contains
    per_axis = lpips25d.per_axis(x, y)
    assert per_axis.shape == (3,)
    assert per_axis[0].item() == pytest.approx(0.0, abs=1e-7)
    assert per_axis[1] > 0 and per_axis[2] > 0  # seen by the slices of the other two axes


def test_lpips25d_random_slices_are_reproducible_and_gradients_reach_input(lpips25d):
    net = LPIPS25D(lpips25d.net, slices_per_axis=2, random_slices=True)
    x, y = volume(0), volume(1).requires_grad_()
    v1 = net(x, y, torch.Generator().manual_seed(1))
    v2 = net(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(v1, v2)
    v1.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    net.train()
    assert not net.net.training  # lpips dropout stays off inside a training parent
    assert not any(p.requires_grad for p in net.parameters())


# -- weight policy ----------------------------------------------------------------------------------


def test_explicit_weights_file_is_loaded(alexnet_file, empty_hub):
    path, state = alexnet_file
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomBackboneWarning)
        net, description = build_lpips("alex", str(path))
    assert description == f"alex: ImageNet weights from {path}"
    loaded = net.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_torchvision_features_file_is_accepted(alexnet_file, tmp_path, empty_hub):
    _, state = alexnet_file
    as_torchvision = {f"features.{k.split('.', 1)[1]}": v for k, v in state.items()}  # hub-cache layout
    as_torchvision["classifier.1.weight"] = torch.zeros(2, 2)
    path = tmp_path / "alexnet-tv.pth"
    torch.save(as_torchvision, path)
    net, description = build_lpips("alex", path)
    assert str(path) in description
    assert torch.equal(net.net.slice1[0].weight, state["slice1.0.weight"])


def test_hub_cache_weights_are_found(alexnet_file, empty_hub):
    _, state = alexnet_file
    cached = hub_weights_path("alex")
    assert cached.parent == empty_hub / "checkpoints" and cached.name.startswith("alexnet")
    cached.parent.mkdir(parents=True)
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in state.items()}, cached)
    net, description = build_lpips("alex")
    assert description == f"alex: ImageNet weights from {cached}"
    assert torch.equal(net.net.slice5[0].weight, state["slice5.10.weight"])


def test_no_weights_warns_loudly_and_says_random(empty_hub, caplog):
    before = torch.random.get_rng_state()
    with pytest.warns(RandomBackboneWarning, match="NOT comparable"):
        net1, description = build_lpips("alex")
    assert "RANDOM" in description and description in caplog.text
    assert torch.equal(torch.random.get_rng_state(), before)  # seeded in a forked RNG
    with pytest.warns(RandomBackboneWarning):
        net2, _ = build_lpips("alex")
    assert torch.equal(net1.net.slice1[0].weight, net2.net.slice1[0].weight)  # reproducible values


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        build_lpips("alex", tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not hold"):
        build_lpips("alex", wrong)


def test_from_params_returns_module_and_description(alexnet_file):
    path, _ = alexnet_file
    module, description = LPIPS25D.from_params(VQGANLossParams(lpips_weights=str(path), lpips_slices_per_axis=3))
    assert isinstance(module, LPIPS25D) and module.slices_per_axis == 3 and str(path) in description
