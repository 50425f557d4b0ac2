"""Named inputs of a pipeline beside its main one (e.g. a planning CT as ``reference``).

The first :class:`~models.registry.InputSpec` of a pipeline is its main input: the series a job
runs on (API: ``series_id``/``study_id``; CLI: the ``INPUT`` argument). Every later InputSpec is
an *extra input*, given by name (API: ``"inputs": {"reference": "<series id>"}``; CLI:
``--input reference=PATH``) and passed to the pipeline under that name in its ``inputs`` mapping.
An extra input is optional unless its InputSpec says ``required=True``.

These checks need only the registry record (no store, no files), so the gateway runs them at
submission and the runner again before it reads anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from models.errors import InputRejected, InvalidParameters
from models.registry import InputSpec, PipelineSpec


def describe_inputs(spec: PipelineSpec) -> str:
    """One line naming every input: ``image (CT, main), reference (CT, optional)``."""
    parts = []
    for n, item in enumerate(spec.inputs):
        role = "main" if n == 0 else ("required" if item.required else "optional")
        parts.append(f"{item.name} ({', '.join(item.modalities)}, {role})")
    return ", ".join(parts)


def extra_input(spec: PipelineSpec, name: str) -> InputSpec:
    """The extra input ``name`` of ``spec``.

    Raises:
        InvalidParameters: ``name`` is the main input, or unknown (with a did-you-mean hint and
            the inputs the pipeline takes).
    """
    extras = {item.name: item for item in spec.inputs[1:]}
    if name in extras:
        return extras[name]
    if name == spec.inputs[0].name:
        raise InvalidParameters(
            f"{spec.name}: {name!r} is the main input; give it as the job's series or study "
            "(CLI: the INPUT argument), not as an extra input"
        )
    close = difflib.get_close_matches(name, list(extras), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InvalidParameters(
        f"{spec.name}: unknown input {name[:64]!r}{hint}; it takes {describe_inputs(spec)}"
    )


def check_extra_names(spec: PipelineSpec, names: Iterable[str]) -> list[InputSpec]:
    """Check the names of the extra inputs given for one job.

    Args:
        spec: The pipeline.
        names: Names of the extra inputs given (each once).

    Returns:
        Their InputSpecs, in the order given.

    Raises:
        InvalidParameters: An unknown name, the main input's name, or a required extra input
            that is missing.
    """
    given = [extra_input(spec, name) for name in names]
    have = {item.name for item in given}
    missing = [item.name for item in spec.inputs[1:] if item.required and item.name not in have]
    if missing:
        raise InvalidParameters(
            f"{spec.name} needs input {', '.join(repr(m) for m in missing)}; "
            f"it takes {describe_inputs(spec)}"
        )
    return given


def check_extra_modality(spec: PipelineSpec, item: InputSpec, modality: str, what: str) -> None:
    """Refuse an extra input whose modality its InputSpec does not accept.

    Args:
        spec: The pipeline.
        item: The extra input's InputSpec.
        modality: The modality of what was given (``""`` when unknown).
        what: How to name what was given in the message (e.g. ``"series 3f2c..."``).

    Raises:
        InputRejected: Naming the input, the accepted modalities and the given one.
    """
    if modality not in item.modalities:
        raise InputRejected(
            f"{spec.name} input {item.name!r} accepts modalities {', '.join(item.modalities)}; "
            f"{what} is {modality or 'of unknown modality'}"
        )
