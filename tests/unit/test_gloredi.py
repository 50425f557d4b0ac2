"""GloReDi-style network: global receptive field of the FFC branch, shapes, size, losses."""

from __future__ import annotations

import pytest
import torch

from models.networks.gloredi import (
    FFCBlock,
    FourierUnit,
    GloReDiNet,
    band_contrastive_loss,
    band_pass,
    direction_loss,
    parameter_bytes,
)


def test_fourier_unit_sees_the_whole_image() -> None:
    torch.manual_seed(0)
    unit = FourierUnit(4).eval()
    x = torch.randn(1, 4, 24, 30)
    bumped = x.clone()
    bumped[0, 1, 3, 5] += 1.0
    with torch.no_grad():
        change = (unit(bumped) - unit(x)).abs()
    # every output element of every channel moved: a 1x1 conv of the spectrum is global
    assert bool((change > 1e-7).all())


def test_ffc_block_global_branch_is_global_local_branch_is_not() -> None:
    torch.manual_seed(1)
    block = FFCBlock(8).eval()
    x = torch.randn(1, 8, 32, 32)
    bumped = x.clone()
    bumped[0, :, 0, 0] += 1.0
    with torch.no_grad():
        _, g0 = block(x)
        _, g1 = block(bumped)
    assert bool(((g1 - g0).abs() > 1e-7).all())
    with torch.no_grad():
        l0 = block.local(block.split(x).chunk(2, dim=1)[0])
        l1 = block.local(block.split(bumped).chunk(2, dim=1)[0])
    far = (l1 - l0).abs()[..., 5:, 5:]
    assert float(far.max()) == 0.0


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 37, 50), (3, 1, 20, 28)])
def test_forward_shapes(shape: tuple[int, int, int, int]) -> None:
    net = GloReDiNet(features=8, ffc_blocks=2, embed=16)
    views = torch.tensor([18.0, 36.0, 60.0][: shape[0]])
    out = net(torch.randn(shape), views)
    assert out.image.shape == shape
    h, w = -(-shape[2] // 4), -(-shape[3] // 4)
    assert out.representation.shape == (shape[0], 16, h, w)
    assert torch.isfinite(out.image).all()


def test_fresh_network_is_identity_and_views_condition_it() -> None:
    torch.manual_seed(2)
    net = GloReDiNet(features=8, ffc_blocks=1, embed=16).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([18.0])).image, x)  # zero-initialised head
        for film in net.films:
            torch.nn.init.normal_(film.proj.weight, std=0.5)
        torch.nn.init.normal_(net.head.weight, std=0.5)
        a = net(x, torch.tensor([18.0])).image
        b = net(x, torch.tensor([60.0])).image
    assert float((a - b).abs().max()) > 1e-4


def test_default_model_fits_20_mb_fp16() -> None:
    assert parameter_bytes(GloReDiNet()) <= 20 * 2**20


def test_direction_loss_measures_direction_only() -> None:
    s = torch.randn(3, 4, 5, 5)
    assert float(direction_loss(s, 2.5 * s)) == pytest.approx(0.0, abs=1e-6)
    assert float(direction_loss(s, -s)) == pytest.approx(2.0, abs=1e-6)


def test_band_pass_bands_add_up_and_contrast_prefers_matches() -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 3, 12, 16)
    total = band_pass(x, 0.0, 0.5) + band_pass(x, 0.5, 2.0)
    assert torch.allclose(total, x, atol=1e-5)
    teacher = x + 0.1 * torch.randn_like(x)
    matched = band_contrastive_loss(x, teacher)
    shuffled = band_contrastive_loss(x, teacher[torch.tensor([1, 2, 3, 0])])
    assert float(matched) < float(shuffled)
    assert float(band_contrastive_loss(x[:1], teacher[:1])) == 0.0
