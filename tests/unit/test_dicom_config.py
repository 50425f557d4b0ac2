"""The DICOM configuration file: nodes, listener and routing rules are validated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.errors import InvalidParameters
from service.dicom.config import check_ae_title, load_dicom_config, parse_dicom_config
from service.settings import Settings

GOOD = """
[listener]
ae_title = "VOXELGATE"
port = 11112
tenant = "radiology"
stable_age_s = 5

[nodes.pacs]
ae_title = "ORTHANC"
port = 4242
dicomweb_url = "http://127.0.0.1:8042/dicom-web"

[nodes.web]
dicomweb_url = "http://127.0.0.1:8043/dicom-web"
send_via = "dicomweb"
retrieve_via = "dicomweb"

[[rules]]
name = "ct"
calling_ae = "ORTH.*"
modality = "CT"
pipeline = "zeroshot-denoise"
params = { max_iterations = 30 }
priority = 7
destinations = ["pacs", "web"]
"""


def test_good_file_parses_with_names_and_defaults() -> None:
    config = parse_dicom_config(GOOD)
    assert config.listener.tenant == "radiology"
    assert config.listener.stable_age_s == 5
    assert config.nodes["pacs"].name == "pacs"
    assert config.nodes["pacs"].has_dimse
    assert not config.nodes["web"].has_dimse
    assert config.node_by_ae("ORTHANC  ") is config.nodes["pacs"]
    assert config.node_by_ae("OTHER") is None
    rule = config.rules[0]
    assert (rule.pipeline, rule.priority, rule.destinations) == (
        "zeroshot-denoise",
        7,
        ("pacs", "web"),
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[listener]\nae_title = 'A\\\\B'\n", "AE title"),
        ("[listener]\nae_title = 'WAY_TOO_LONG_FOR_DICOM'\n", "AE title"),
        ("[listener]\nport = 70000\n", "listener.port"),
        ("[listener]\nbogus = 1\n", "listener.bogus"),
        ("[nodes.x]\nhost = '127.0.0.1'\n", "ae_title and port"),
        ("[nodes.x]\nae_title = 'X'\nport = 1\nsend_via = 'dicomweb'\n", "needs dicomweb_url"),
        ("[[rules]]\nname = 'r'\npipeline = 'no-such'\n", "unknown pipeline"),
        ("[[rules]]\nname = 'r'\npipeline = 'zeroshot-denoise'\nmodality = '(['\n", "regular"),
        (
            "[[rules]]\nname = 'r'\npipeline = 'zeroshot-denoise'\n"
            "params = { max_iterations = -1 }\n",
            "rules.0",
        ),
        (
            "[[rules]]\nname = 'r'\npipeline = 'zeroshot-denoise'\ndestinations = ['gone']\n",
            "unknown destination",
        ),
        ("listener = [", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_with_the_field(text: str, needle: str) -> None:
    with pytest.raises(InvalidParameters, match=needle):
        parse_dicom_config(text, "cfg.toml")


def test_unknown_node_lists_the_known_ones() -> None:
    config = parse_dicom_config(GOOD)
    with pytest.raises(InvalidParameters, match="known nodes: pacs, web"):
        config.node("nope")


def test_ae_title_rules() -> None:
    assert check_ae_title(" PACS ") == "PACS"
    for bad in ("", "    ", "A\\B", "Ä", "X" * 17):
        with pytest.raises(ValueError, match="AE title"):
            check_ae_title(bad)


def test_load_follows_file_changes(tmp_path: Path) -> None:
    assert load_dicom_config(Settings(data_dir=tmp_path)).nodes == {}
    path = tmp_path / "dicom.toml"
    path.write_text(GOOD)
    settings = Settings(data_dir=tmp_path, dicom_config=path)
    assert set(load_dicom_config(settings).nodes) == {"pacs", "web"}
    path.write_text(GOOD.replace("[nodes.web]", "[nodes.web2]").replace('"web"]', '"web2"]'))

    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    assert set(load_dicom_config(settings).nodes) == {"pacs", "web2"}
    path.unlink()
    with pytest.raises(InvalidParameters, match=r"dicom\.toml"):
        load_dicom_config(settings)


def test_the_bundled_example_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "dicom.toml"
    config = parse_dicom_config(example.read_text(), str(example))
    assert config.listener.ae_title == "VOXELGATE"
    assert config.rules[0].destinations == ("pacs",)
    assert config.node_by_ae("CT_SCANNER_1") is config.nodes["ct1"]
