"""The cbct-to-sct network: selective scan, global skips, losses, slice sampling, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.networks.glfc import (
    DEFAULT_CONFIGS,
    ConvBlock,
    SCTUNet,
    SkipMamba,
    build_network,
    parameter_count,
)
from models.networks.selective_scan import backend_for, sequential_scan, ssd_scan
from models.training.sct_data import SCTCase, sample_batch, stack_slices
from models.training.sct_losses import sct_loss, ssim_map
from models.training.sct_train import SCTTrainConfig, learning_rate, train
from tests.unit.sct_world import assert_halves_the_cbct_error, bias_config, synthetic_case


@pytest.mark.parametrize(("length", "chunk"), [(100, 16), (64, 64), (37, 8), (5, 64)])
def test_chunked_scan_equals_the_step_by_step_recurrence(length: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 3, 4, generator=gen)
    a = -torch.rand(2, length, 3, generator=gen)
    b = torch.randn(2, length, 3, 5, generator=gen)
    c = torch.randn(2, length, 3, 5, generator=gen)
    ref = sequential_scan(x, a, b, c)
    out = ssd_scan(x, a, b, c, chunk=chunk)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_shared_bc_groups_equal_repeating_them_per_head() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 45, 4, 3, generator=gen)
    a = -torch.rand(2, 45, 4, generator=gen)
    b = torch.randn(2, 45, 2, 5, generator=gen)  # 2 groups of 2 heads
    c = torch.randn(2, 45, 2, 5, generator=gen)
    # head h reads group h // 2, as mamba_ssm's ngroups does
    b_heads, c_heads = b[:, :, [0, 0, 1, 1]], c[:, :, [0, 0, 1, 1]]
    ref = sequential_scan(x, a, b_heads, c_heads)
    assert torch.allclose(ssd_scan(x, a, b, c, chunk=16), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(sequential_scan(x, a, b, c), ref)
    with pytest.raises(ValueError, match="do not divide"):
        ssd_scan(x, a, b[:, :, :1].expand(-1, -1, 3, -1), c[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="do not divide"):
        SkipMamba(64, groups=3)
    # one shared pair per block: the projection holds 4 x (heads + 2 d_state) outputs
    assert SkipMamba(64, d_state=16, groups=1).x_proj.out_features == 4 * (4 + 2 * 16)


def test_scan_backend_on_cpu_is_pure_torch() -> None:
    assert backend_for(torch.device("cpu")) == "torch-ssd"


def test_skip_mamba_starts_as_identity_and_sees_the_whole_slice() -> None:
    torch.manual_seed(0)
    block = SkipMamba(32).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        assert torch.equal(block(x), x)
        block.gamma.fill_(1.0)
        y0 = block(x)
        x2 = x.clone()
        x2[0, :, 0, 0] += 3.0 * torch.randn(32)  # one corner pixel (not a constant shift,
        # which the channel LayerNorm would remove)
        y1 = block(x2)
    # the opposite corner answers: every output sees every input (global receptive field)
    assert (y1 - y0)[..., 15, 15].abs().max() > 1e-6  # deterministic: 0 if unreachable
    # two 3 x 3 convolutions (no normalisation, whose statistics are slice-wide) stay local
    local = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1)
    )
    with torch.no_grad():
        assert torch.equal(local(x2)[..., 15, 15], local(x)[..., 15, 15])


def test_network_starts_as_the_identity_and_sizes_match() -> None:
    torch.manual_seed(0)
    net = build_network(DEFAULT_CONFIGS["glfc"]).eval()
    x = torch.randn(2, 5, 32, 48)
    with torch.no_grad():
        assert torch.equal(net(x), x[:, 2:3])
    glfc, unet = (parameter_count(build_network(DEFAULT_CONFIGS[a])) for a in ("glfc", "unet"))
    assert glfc <= unet < 1.05 * glfc  # the baseline is never the smaller network
    assert ConvBlock(5, 16)(x).shape == (2, 16, 32, 48)
    assert sum(isinstance(m, SkipMamba) for m in net.modules()) == 2
    assert not any(
        isinstance(m, SkipMamba) for m in build_network(DEFAULT_CONFIGS["unet"]).modules()
    )
    with pytest.raises(ValueError, match="unknown sCT architecture"):
        build_network({"arch": "transformer"})


def test_loss_is_zero_for_a_perfect_prediction_and_weighs_soft_tissue() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(2, 1, 32, 32, generator=gen) * 0.3 - 0.1  # -100..200 HU
    mask = torch.ones_like(target)
    loss, terms = sct_loss(target, target, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    assert terms["ssim_soft_tissue"] == pytest.approx(1.0, abs=1e-5)
    soft, _ = sct_loss(target + 0.02, target, mask)  # +20 HU in soft tissue
    # a +20 HU bias is 0.02 of full-range L1 but 0.05 of the 400 HU soft-tissue window
    _, t = sct_loss(target + 0.02, target, mask)
    assert t["l1"] == pytest.approx(0.02, rel=1e-3)
    assert t["l1_soft_tissue"] == pytest.approx(0.05, rel=1e-2)
    assert float(soft) > 0.07
    outside = torch.zeros_like(mask)
    outside[..., :12] = 1.0
    bad = target.clone()
    bad[..., 16:] += 1.0  # error only outside the mask, beyond the 7 x 7 SSIM window
    assert float(sct_loss(bad, target, outside)[0]) < 1e-3


def test_ssim_map_of_an_image_with_itself_is_one() -> None:
    img = torch.rand(1, 1, 20, 20)
    assert torch.allclose(ssim_map(img, img), torch.ones_like(img), atol=1e-5)
    assert float(ssim_map(img, torch.rand(1, 1, 20, 20)).mean()) < 0.5


def _case(seed: int, shape: tuple[int, int, int] = (12, 40, 36)) -> SCTCase:
    return synthetic_case(seed, shape)


def test_sample_batch_is_a_function_of_seed_and_step() -> None:
    cases = [_case(1), _case(2)]
    a = sample_batch(cases, seed=3, step=7, batch=4, context=2, size=32)
    b = sample_batch(cases, seed=3, step=7, batch=4, context=2, size=32)
    c = sample_batch(cases, seed=3, step=8, batch=4, context=2, size=32)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    x, y, m = a
    assert x.shape == (4, 5, 32, 32)
    assert y.shape == m.shape == (4, 1, 32, 32)
    padded = sample_batch(cases, seed=0, step=0, batch=1, context=1, size=48)[0]
    assert padded.shape == (1, 3, 48, 48)
    assert padded[0, 0, 0, 0] == pytest.approx(-1.0)


def test_stack_slices_repeats_edge_slices() -> None:
    vol = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 2), np.float32)
    assert stack_slices(vol, 0, 2)[:, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert stack_slices(vol, 3, 1)[:, 0, 0].tolist() == [2, 3, 3]


def test_case_shapes_must_match() -> None:
    with pytest.raises(InputRejected, match="same 3D shape"):
        SCTCase("x", np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.ones((2, 3, 4), bool))


def test_learning_rate_warms_up_then_decays() -> None:
    config = SCTTrainConfig(steps=100, warmup=10, lr=1e-3)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 10) == pytest.approx(1e-3)
    assert learning_rate(config, 99) < 1e-4


def test_training_a_small_network_corrects_a_hu_bias() -> None:
    cases, val = [_case(s) for s in range(4)], [_case(9)]
    config = bias_config("glfc", batch=4, features=(8, 16, 32))
    saved: list[int] = []
    outcome = train(config, cases, val, save=lambda s: saved.append(s["step"]))
    assert_halves_the_cbct_error(outcome)
    assert saved[-1] == 60
    resumed = train(
        SCTTrainConfig(**{**config.__dict__, "steps": 70}), cases, val, resume_state=outcome.state
    )
    assert resumed.history[-1]["step"] == 70
    # resumed from a checkpoint without the best weights: the best is chosen again afterwards
    slim = {**outcome.state, "best_model": None}
    again = train(SCTTrainConfig(**{**config.__dict__, "steps": 90}), cases, val, resume_state=slim)
    assert again.best["step"] == 90
    assert again.state["best_model"] is not None
    with pytest.raises(InputRejected, match="cannot resume"):
        train(
            SCTTrainConfig(**{**config.__dict__, "batch": 2}),
            cases,
            val,
            resume_state=outcome.state,
        )


def test_unet_has_no_global_blocks_but_same_interface() -> None:
    net = SCTUNet(context=1, features=(8, 16), global_skips=(False, False)).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 16, 16)).shape == (1, 1, 16, 16)
