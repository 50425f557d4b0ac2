import subprocess
import sys

import pytest

from models.errors import InvalidParameters, UnknownPipeline
from models.registry import all_specs, get_spec, load_pipeline, validate_params


def test_every_spec_is_complete():
    specs = all_specs()
    assert [s.name for s in specs] == sorted(
        {s.name for s in specs}, key=[s.name for s in specs].index
    )
    for spec in specs:
        assert spec.queue in ("gpu", "cpu")
        assert spec.inputs
        assert spec.outputs
        assert "## Weights and training data" in spec.card_text()
        assert spec.weights_sha256() == "none" or len(spec.weights_sha256()) == 64
        validate_params(spec, {})  # defaults are valid
        assert callable(load_pipeline(spec))


def test_unknown_pipeline_suggests_close_name():
    with pytest.raises(UnknownPipeline, match="did you mean 'zeroshot-denoise'"):
        get_spec("zeroshot-denoize")


def test_unknown_parameter_is_refused_with_hint():
    spec = get_spec("zeroshot-denoise")
    with pytest.raises(InvalidParameters, match=r"'max_iteration' \(did you mean 'max_iterations'"):
        validate_params(spec, {"max_iteration": 10})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"context_slices": 9}, "context_slices"),
        ({"device": "tpu"}, "device"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_bad_values_name_the_field(params, field):
    with pytest.raises(InvalidParameters, match=field):
        validate_params(get_spec("zeroshot-denoise"), params)


def test_listing_does_not_import_torch():
    code = (
        "import sys\n"
        "from service.cli import main\n"
        "assert main(['pipelines']) == 0\n"
        "assert main(['pipelines', 'zeroshot-denoise']) == 0\n"
        "assert 'torch' not in sys.modules, 'listing imported torch'\n"
        "assert 'monai' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "zeroshot-denoise" in out.stdout


def test_service_package_never_imports_torch():
    code = (
        "import sys, pkgutil, importlib, service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in ('torch', 'monai') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
