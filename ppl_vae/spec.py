"""Model specs, the public module: load a spec from TOML or a bundled model, apply dotted
overrides, validate, write the resolved spec back as TOML.

The schema (registries, dataclasses, `SpecError`) is `ppl_vae.schema`, re-exported here, so
``from ppl_vae.spec import Spec, load_spec`` is all a user needs; the cross-field checks are
`ppl_vae.validation`. Every mistake (unknown key, wrong type, unknown kind, impossible
combination) is a ``SpecError`` that names where the value came from (the file, ``--set``, a
flag), the dotted key, the value given and what is allowed, raised before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

# The schema's names are this module's too (``from ppl_vae.spec import Spec, SpecError``).
from ppl_vae.schema import (  # noqa: F401
    ACTIVATIONS,
    AUX_KINDS,
    BASELINES,
    BINARIZE,
    BOUNDS,
    DATA_SOURCES,
    DECODER_KINDS,
    DEVICES,
    DISCRETE_PRIOR_KINDS,
    DISTORTIONS,
    ENCODER_KINDS,
    ESTIMATORS,
    GRADIENTS,
    LABEL_SITE,
    LATENT_KINDS,
    LIKELIHOOD_KINDS,
    LR_SCHEDULE_KINDS,
    MATMUL_PRECISIONS,
    MAX_ENUMERATED,
    PATH_SOURCES,
    POSTERIOR_KINDS,
    PRIOR_KINDS,
    RESERVED_SITE_NAMES,
    SCHEDULE_KINDS,
    SOURCE_IMAGE_SHAPES,
    STREAM_MODES,
    SYNTHETIC_POPULATIONS,
    WEIGHT_INITS,
    AuxSpec,
    CapacitySpec,
    DataSpec,
    DecoderSpec,
    EncoderSpec,
    LabelSpec,
    LatentSpec,
    LikelihoodSpec,
    LRScheduleSpec,
    ObjectiveSpec,
    PosteriorSpec,
    PriorSpec,
    ScheduleSpec,
    SiteSpec,
    Spec,
    SpecError,
    TemperatureSpec,
    TrainSpec,
    _from_dict,
    resolve_user_function,
    spec_to_dict,
)
from ppl_vae.validation import validate


def spec_from_dict(table: dict, source: str | None = None) -> Spec:
    """Build and validate a `Spec` from nested plain data (what `tomllib` returns)."""
    spec = _from_dict(Spec, table, "", source)
    spec = dataclasses.replace(spec, source=source or "")
    validate(spec)
    return spec


# ---- files, names and overrides ----------------------------------------------------------------
def models_dir() -> Path:
    """The bundled `models/` folder (next to the package in a source checkout)."""
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path.cwd() / "models"


def list_models() -> list[tuple[str, str]]:
    """(name, description) of each bundled spec in `models/`."""
    out = []
    for path in sorted(models_dir().glob("*.toml")):
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
        out.append((path.stem, str(table.get("description", ""))))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'objective.beta=4' -> ('objective.beta', 4.0); the value is read as a TOML value.

    A bare word that is not valid TOML (`encoder.kind=conv`) is taken as a string.
    """
    if "=" not in text:
        raise SpecError(text, text, "an override of the form section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(table: dict, overrides, source: str | None = None) -> dict:
    """Return a copy of `table` with dotted `overrides` set.

    Each override is an "a.b=v" string (what `--set` takes), a (key, value) pair, or a
    (key, value, origin) triple whose origin names where the value came from (``"--devices 2"``);
    a mistake in one names that origin, not the spec file.
    """
    import copy

    table = copy.deepcopy(table)
    for item in overrides:
        try:
            key, value, origin = _override_parts(item)
        except SpecError as err:  # no "=": the text itself is the origin
            raise SpecError(err.key, err.given, err.allowed, _override_source(f"--set {item}",
                                                                              source)) from None
        parts = key.split(".")
        node = table
        for i, part in enumerate(parts[:-1]):
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise SpecError(".".join(parts[: i + 1]), sub, "a table to set keys inside",
                                _override_source(origin, source))
            node = sub
        node[parts[-1]] = value
    return table


def _override_parts(item) -> tuple[str, Any, str]:
    """(key, value, origin) of one override; the origin says where it came from."""
    if isinstance(item, str):
        key, value = parse_override(item)
        return key, value, f"--set {item.strip()}"
    if len(item) == 3:
        return item[0], item[1], item[2]
    key, value = item
    return key, value, f"override {key}={value!r}"


def _override_source(origin: str, source: str | None) -> str:
    return f"{origin} (applied to {source})" if source else origin


def _blame(err: SpecError, overrides, source: str | None) -> SpecError:
    """`err` re-sourced to the override that set its key (the last one), else to the file and
    the overrides given with it: an error names where its value came from."""
    parsed = [_override_parts(item) for item in overrides]
    for key, _, origin in reversed(parsed):
        if (err.key == key or err.key.startswith((f"{key}.", f"{key}["))
                or key.startswith(f"{err.key}.")):
            return SpecError(err.key, err.given, err.allowed, _override_source(origin, source))
    if parsed:
        given = ", ".join(origin for _, _, origin in parsed)
        where = f"{source} with {given}" if source else given
        return SpecError(err.key, err.given, err.allowed, where)
    return err


def resolve_spec_path(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
        return path
    candidate = models_dir() / f"{path_or_name}.toml"
    if candidate.is_file():
        return candidate
    names = ", ".join(n for n, _ in list_models()) or "(none found)"
    raise FileNotFoundError(
        f"no spec file or bundled model named {str(path_or_name)!r}; bundled models: {names}"
    )


#: The table of a spec file that `ppl-vae sweep` reads (`ppl_vae.sweep`) and `load_spec` leaves out.
SWEEP_TABLE = "sweep"


def load_spec(path_or_name: str | Path | Spec, overrides=()) -> Spec:
    """Load a spec from a TOML file or a bundled model name, apply dotted overrides, validate.

    >>> spec = load_spec("vae_digits", ["objective.beta=4", "latent.dim=16"])
    """
    if isinstance(path_or_name, Spec):
        table, source = spec_to_dict(path_or_name), path_or_name.source or None
    else:
        path = resolve_spec_path(path_or_name)
        source = str(path)
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise SpecError("(file)", path.name, f"valid TOML ({err})", source) from None
        except UnicodeDecodeError:  # a binary file: often data given where a spec belongs
            raise SpecError("(file)", path.name, "a TOML spec (this file is binary; data such "
                            "as an .npz goes in the spec's data.path)", source) from None
    # a [sweep] table declares a grid of runs of this spec (`ppl_vae.sweep`), not the spec
    table.pop(SWEEP_TABLE, None)
    overrides = list(overrides)
    table = apply_overrides(table, overrides, source)
    try:
        return spec_from_dict(table, source)
    except SpecError as err:
        raise _blame(err, overrides, source) from None


# ---- writing TOML (the resolved spec of a run) ----------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_table(table: dict, prefix: str, lines: list[str]) -> None:
    subtables, arrays = [], []
    for k, v in table.items():
        if isinstance(v, dict):
            subtables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in subtables:
        name = f"{prefix}.{k}" if prefix else k
        lines.extend(["", f"[{name}]"])
        _toml_table(v, name, lines)
    for k, items in arrays:
        name = f"{prefix}.{k}" if prefix else k
        for item in items:
            lines.extend(["", f"[[{name}]]"])
            _toml_table(item, name, lines)


def spec_to_toml(spec: Spec) -> str:
    """The resolved spec as TOML text; `load_spec` of it gives back an equal spec."""
    lines: list[str] = []
    table = spec_to_dict(spec)
    # only the tables of the spec's own form: [[latents]], or [latent], [prior], [posterior]
    for key in ("latent", "prior", "posterior") if spec.latents else ("latents",):
        del table[key]
    _toml_table(table, "", lines)
    return "\n".join(lines) + "\n"
