"""Parameters of ``cbct-to-sct`` (torch-free, used by the registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NETWORK_WEIGHTS: dict[str, str] = {
    "glfc": "weights/cbct_to_sct/glfc/model.pt",
    "unet": "weights/cbct_to_sct/unet/model.pt",
    "unet3d": "weights/cbct_to_sct/unet3d/model.pt",
}
"""Weights of the learned networks, relative to the ``models`` package: the GLFC-style UNet
(selective-scan skips; the default), the plain 2.5D UNet of about the same size and the plain
UNet in 3D (the baselines of ``benchmarks/sct.py``), all made by ``voxelgate train
cbct-to-sct`` with the same data and number of steps (see the model card)."""

Network = Literal["glfc", "unet", "unet3d"]

DEFAULT_NETWORK: Network = "glfc"
"""The GLFC-style network: on the 22 held-out patients of ``benchmarks/sct.py`` it had the
lowest MAE of the three (58.5 HU; plain 2.5D UNet 59.3, 3D UNet 76.9) and the lowest on 21 of
the 22 patients against the plain UNet (see the model card)."""

LEARNED_WEIGHTS = NETWORK_WEIGHTS[DEFAULT_NETWORK]
"""Weights of the default learned network (the registry's weights record)."""

HU_REFERENCE = "weights/cbct_to_sct/hu_reference.json"
"""Reference body-voxel HU quantiles of ``hu-calibration``, relative to the ``models`` package
(made by ``voxelgate dataset hu-reference`` from the OpenKBP training CTs only)."""

Method = Literal["identity", "hu-calibration", "learned"]

DEFAULT_METHOD: Method = "learned"
"""The trained network (weights shipped in ``models/weights/cbct_to_sct``)."""


class CBCTToSCTParams(BaseModel):
    """Validated parameters of CBCT -> synthetic CT.

    ``identity`` returns the CBCT as it is (the baseline every method is compared with);
    ``hu-calibration`` maps the CBCT's HU with one monotone piecewise-linear curve that matches
    the quantiles of its body voxels to a reference CT distribution (shipped, never the
    patient's own planning CT); ``learned`` runs the trained network.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(
        DEFAULT_METHOD,
        description="identity: the CBCT unchanged; hu-calibration: histogram (quantile) "
        "matching of the CBCT's body voxels to the shipped reference CT HU distribution; "
        "learned: the trained network (`network`; the default)",
    )
    body_threshold_hu: float = Field(
        -500.0,
        ge=-950.0,
        le=0.0,
        description="voxels above this HU count as body (largest connected component, holes "
        "filled per axial slice): calibration, metrics and the body mask",
    )
    outside_fov: Literal["keep", "air"] = Field(
        "air",
        description="what the sCT holds outside the CBCT field of view: air (-1000 HU, the "
        "CBCT measured nothing there) or keep (whatever the method produced from the padding)",
    )
    fov_padding_hu: float | None = Field(
        None,
        ge=-32768.0,
        le=32767.0,
        description="value the scanner wrote outside its reconstructed field of view; unset: "
        "detected (the value every slice corner holds, if there is one)",
    )
    network: Network = Field(
        DEFAULT_NETWORK,
        description="learned only: glfc = the GLFC-style 2.5D UNet with selective-scan "
        "(Mamba-2) skip connections (default, the most accurate on the held-out patients); "
        "unet = the plain 2.5D UNet of about the same size; unet3d = the plain UNet in 3D "
        "(16-slice slabs), the 2.5D-vs-3D baseline",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="learned only: auto = CUDA when available, else CPU"
    )
