"""The learned cbct-to-sct method: weights files, geometry of translate(), the shipped networks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.networks.glfc import DEFAULT_CONFIGS, build_network
from models.pipelines.cbct_to_sct.learned import load_weights, translate, weights_record
from models.pipelines.cbct_to_sct.params import NETWORK_WEIGHTS, CBCTToSCTParams
from models.pipelines.cbct_to_sct.pipeline import MODELS_DIR, run
from models.result import no_progress
from models.volume import Volume
from tests.unit.cbct_to_sct_data import full_ct

RANGES = {"slice": [1.5, 3.3], "in_plane": [2.7, 5.5]}
"""Training spacing range written into the test weights (that of the OpenKBP CTs)."""


def _weights(tmp_path: Path, arch: str, bias_hu: float | None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network(DEFAULT_CONFIGS[arch])
    if bias_hu is None:  # a network that is not the identity: random head
        torch.nn.init.normal_(net.head.weight, std=0.05)
    else:
        assert net.head.bias is not None
        with torch.no_grad():
            net.head.bias.fill_(bias_hu / 1000.0)
    path = tmp_path / f"{arch}.pt"
    record = weights_record(DEFAULT_CONFIGS[arch], net.state_dict(), RANGES, {"test": True})
    torch.save(record, path)
    return path


def _ct_crop() -> Volume:
    ct = full_ct()
    affine = ct.affine.copy()
    affine[:3, 3] = ct.index_to_lps([40, 20, 16])
    crop = np.asarray(ct.array[40:56, 20:108, 16:112], np.float32)
    return dataclasses.replace(ct, array=crop, affine=affine)


def test_a_constant_correction_comes_back_on_the_source_grid(tmp_path: Path) -> None:
    weights = _weights(tmp_path, "glfc", bias_hu=50.0)
    cbct = _ct_crop()
    sct, facts = translate(cbct, weights, "cpu", no_progress)
    assert sct.shape == cbct.array.shape
    assert facts["resampled"] is False
    assert facts["scan_backend"] == "torch-ssd"
    np.testing.assert_allclose(sct - cbct.array, 50.0, atol=0.5)
    # 1 mm in-plane: outside the trained range, so resampled; the correction is resampled back
    fine = dataclasses.replace(cbct, affine=cbct.affine @ np.diag([1.0, 0.25, 0.25, 1.0]))
    sct_fine, facts_fine = translate(fine, weights, "cpu", no_progress)
    assert facts_fine["resampled"] is True
    assert facts_fine["network_spacing_mm"][1] == pytest.approx(2.7)
    assert sct_fine.shape == fine.array.shape
    np.testing.assert_allclose(sct_fine - fine.array, 50.0, atol=0.5)


def test_the_sct_does_not_depend_on_how_the_volume_is_stored(tmp_path: Path) -> None:
    weights = _weights(tmp_path, "unet", bias_hu=None, seed=3)
    cbct = _ct_crop()
    sct, _ = translate(cbct, weights, "cpu", no_progress)
    assert np.abs(sct - cbct.array).max() > 1.0  # the network does change the image
    # the same physical image stored with axis 2 reversed and axes 1/2 swapped
    arr = np.ascontiguousarray(np.asarray(cbct.array)[:, :, ::-1].transpose(0, 2, 1))
    aff = cbct.affine.copy()
    aff[:3, 3] = cbct.index_to_lps([0, 0, cbct.array.shape[2] - 1])
    aff[:3, 2] = -cbct.affine[:3, 2]
    aff[:3, [1, 2]] = aff[:3, [2, 1]]
    other = dataclasses.replace(cbct, array=arr, affine=aff)
    sct_other, _ = translate(other, weights, "cpu", no_progress)
    back = sct_other.transpose(0, 2, 1)[:, :, ::-1]
    np.testing.assert_allclose(back, sct, atol=1e-3)


def test_bad_weights_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputRejected, match="not installed"):
        load_weights(tmp_path / "missing.pt", torch.device("cpu"))
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(InputRejected, match="voxelgate-sct/1"):
        load_weights(other, torch.device("cpu"))
    bad = tmp_path / "bad.pt"
    state = build_network(DEFAULT_CONFIGS["unet"]).state_dict()
    torch.save(weights_record(DEFAULT_CONFIGS["glfc"], state, RANGES, {}), bad)
    with pytest.raises(InputRejected, match="do not fit"):
        load_weights(bad, torch.device("cpu"))


@pytest.mark.parametrize("network", ["glfc", "unet", "unet3d"])
def test_shipped_network_reduces_the_error_of_a_held_out_cbct(network: str) -> None:
    if not (MODELS_DIR / NETWORK_WEIGHTS[network]).is_file():
        pytest.skip(f"{NETWORK_WEIGHTS[network]} is not shipped")
    from models.physics.cbct import CBCTGeometry, random_artefacts, simulate_cbct

    ct = full_ct()  # validation patient pt_201: never trained on
    artefacts = dataclasses.replace(
        random_artefacts(7_000_201), shift_mm=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0)
    )
    geometry = CBCTGeometry(n_projections=90, detector_pitch_mm=8.0)
    cbct = simulate_cbct(ct, geometry, artefacts, seed=7_000_201).volume
    params = CBCTToSCTParams(method="learned", network=network, device="cpu")
    result = run({"image": cbct, "reference": ct}, params, no_progress)
    metrics = result.measurements["metrics"]
    assert metrics["sct"]["mae_hu"] < 0.7 * metrics["cbct"]["mae_hu"]
    assert metrics["sct"]["ssim"] > metrics["cbct"]["ssim"]
    assert result.provenance.weights_sha256 != "none"
