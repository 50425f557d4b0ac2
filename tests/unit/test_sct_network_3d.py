"""The 3D cbct-to-sct UNet: patch sampling, slab-wise inference and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.networks.glfc import DEFAULT_CONFIGS, SCTUNet, build_network, parameter_count
from models.pipelines.cbct_to_sct.learned import predict_canonical, predict_volume_3d
from models.training.sct_data import SCTCase, sample_patches
from models.training.sct_train import train
from tests.unit.sct_world import assert_halves_the_cbct_error, bias_config, synthetic_case


def _case(seed: int, shape: tuple[int, int, int] = (20, 40, 36)) -> SCTCase:
    return synthetic_case(seed, shape)


def test_3d_network_is_the_plain_unet_in_3d_of_about_its_size() -> None:
    net3d = build_network(DEFAULT_CONFIGS["unet3d"]).eval()
    assert net3d.dims == 3
    plain = parameter_count(build_network(DEFAULT_CONFIGS["unet"]))
    assert abs(parameter_count(net3d) - plain) < 0.02 * plain
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        assert torch.equal(net3d(x), x)  # zero head: an untrained network is the identity
    with pytest.raises(ValueError, match="patch_slices"):
        build_network({**DEFAULT_CONFIGS["unet3d"], "patch_slices": 12})
    with pytest.raises(ValueError, match="no scan blocks"):  # the scan is a 2D block
        SCTUNet(context=0, features=(16, 32), global_skips=(False, True), dims=3)


def test_sample_patches_are_consecutive_slices_and_a_function_of_seed_and_step() -> None:
    cases = [_case(1), _case(2, (6, 40, 36))]
    a = sample_patches(cases, seed=3, step=7, batch=4, depth=8, size=32)
    b = sample_patches(cases, seed=3, step=7, batch=4, depth=8, size=32)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    x, y, m = a
    assert x.shape == y.shape == m.shape == (4, 1, 8, 32, 32)
    # the CBCT is 0.9 CT - 60 HU voxel by voxel: input and target are the same slices
    inside = m > 0
    assert np.allclose(x[inside] * 1000, np.trunc(0.9 * y[inside] * 1000 - 60), atol=1.0)
    # the 6-slice case is padded to 8 slices with air, masked out
    short = None
    for step in range(40):
        xs, _, ms = sample_patches(cases, seed=0, step=step, batch=1, depth=8, size=32)
        if ms[0, 0, 6:].sum() == 0:
            short = xs
            break
    assert short is not None
    assert np.all(short[0, 0, 6:] == pytest.approx(-1.0))


def test_slab_inference_keeps_each_slabs_centre_and_covers_every_slice() -> None:
    torch.manual_seed(0)
    net = SCTUNet(context=0, features=(8, 16), global_skips=(False, False), dims=3).eval()
    torch.nn.init.normal_(net.head.weight, std=0.5)  # a network that changes its input
    cbct = np.random.default_rng(0).normal(0, 300, (13, 16, 24)).astype(np.float32)
    out = predict_volume_3d(net, cbct, 8, bf16=False)
    assert out.shape == cbct.shape
    assert np.all(np.isfinite(out))
    assert not np.allclose(out, cbct)
    # slices 4..7 are the central half of the slab starting at slice 2 (pad: 2 before)
    with torch.no_grad():
        slab = net(torch.from_numpy(cbct[2:10] / 1000.0)[None, None])
    assert np.allclose(out[4:8], slab[0, 0, 2:6].numpy() * 1000.0, atol=1e-3)
    via_config = predict_canonical(net, {"patch_slices": 8}, cbct, bf16=False)
    assert np.array_equal(via_config, out)
    with pytest.raises(InputRejected, match="multiple of 4"):
        predict_volume_3d(net, cbct, 6)


def test_training_the_3d_network_corrects_a_hu_bias() -> None:
    cases, val = [_case(s) for s in range(4)], [_case(9)]
    outcome = train(bias_config("unet3d", batch=2, features=(16, 32)), cases, val)
    assert_halves_the_cbct_error(outcome)
    assert outcome.state["network"]["arch"] == "unet3d"
