"""Declaring a sweep: a grid of dotted overrides and seeds, expanded into named points.

``--grid objective.beta=0.5,1,2`` (any number of them) and ``--seeds 5`` (train.seed = the
spec's seed + 0 … 4), or a ``[sweep]`` table in the spec file that `ppl_vae.spec.load_spec`
leaves out (`load_sweep`), make a `Sweep`: the Cartesian product of the grid's axes and the seeds,
each point (`Point`) with its folder name (``03-beta2-seed1``: its index and the short names of
its setting, `short_names`) and its resolved, validated spec. Nothing here trains or touches a
folder.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppl_vae import runs
from ppl_vae.spec import (
    SWEEP_TABLE,
    Spec,
    SpecError,
    load_spec,
    parse_override,
    resolve_spec_path,
)

#: The keys a ``[sweep]`` table may hold.
SWEEP_KEYS = ("grid", "seeds", "engine", "workers", "vmap_size")


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid, a folder of another sweep, …): one line."""


def _split_values(raw: str) -> list[str]:
    """'0.5,1,[64, 64]' -> ['0.5', '1', '[64, 64]']: commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(text: str) -> tuple[str, tuple]:
    """'objective.beta=0.25,0.5,1' -> ('objective.beta', (0.25, 0.5, 1.0)): each value read as
    a TOML value, as --set reads one (a bare word is a string; lists in brackets)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    values = [v for v in _split_values(raw)] if sep else []
    if not key or not values or any(v == "" for v in values):
        raise SweepError(f"--grid {text!r}: expected KEY=V1,V2,… (e.g. --grid "
                         "objective.beta=0.5,1,2)")
    parsed = tuple(parse_override(f"{key}={v}")[1] for v in values)
    if len(set(map(repr, parsed))) != len(parsed):
        raise SweepError(f"--grid {text!r}: a value is given twice")
    return key, parsed


def parse_seeds(value, base_seed: int = 0) -> tuple[int, ...]:
    """A count N (train.seed = base … base + N − 1), or a list of seeds ('0,3,7' or [0, 3])."""
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if re.fullmatch(r"\d+", value) else [
            int(v) for v in value.split(",") if v.strip().lstrip("-").isdigit()] or value
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise SweepError(f"--seeds {value!r}: give a count (--seeds 5) or a list of seeds "
                         "(--seeds 0,3,7)")
    if isinstance(value, int):
        if value < 1:
            raise SweepError(f"--seeds {value}: at least 1")
        return tuple(range(base_seed, base_seed + value))
    seeds = tuple(int(s) for s in value)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {value!r}: a list of distinct seeds")
    return seeds


def _short_value(value) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "x".join(_short_value(v) for v in value) or "none"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's shortest tail that no other key shares: objective.beta -> beta;
    encoder.hidden and decoder.hidden -> encoder_hidden, decoder_hidden."""
    out = {}
    for key in keys:
        parts = key.replace("[", ".").replace("]", "").split(".")
        for n in range(1, len(parts) + 1):
            tail = "_".join(parts[-n:])
            others = ["_".join(o.replace("[", ".").replace("]", "").split(".")[-n:])
                      for o in keys if o != key]
            if tail not in others:
                break
        out[key] = tail
    return out


def setting_label(setting: Mapping[str, Any]) -> str:
    """A grid setting {dotted key: value} as text, by short names: 'beta=0.5, dim=8' ('base'
    for the empty setting)."""
    names = short_names(list(setting))
    return ", ".join(f"{names[k]}={_short_value(v)}" for k, v in setting.items()) or "base"


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its place, folder name, grid setting, seed and resolved spec."""

    index: int
    name: str
    setting: tuple[tuple[str, Any], ...]  # (dotted key, value) of each grid axis, in order
    seed: int | None  # None when the sweep has no seed axis
    spec: Spec = field(repr=False)

    @property
    def label(self) -> str:
        """The grid setting as text, seeds left out: 'beta=0.5, dim=8'."""
        return setting_label(dict(self.setting))


@dataclass(frozen=True)
class Sweep:
    """The base spec, the grid (key, values) axes, the seeds and the points they make."""

    base: Spec
    grid: tuple[tuple[str, tuple], ...]
    seeds: tuple[int, ...] | None
    points: tuple[Point, ...]
    options: dict = field(default_factory=dict)  # the [sweep] table's engine, workers, …

    def definition(self, backend: str) -> dict:
        """What must match for a second run of the sweep into the same folder to continue it."""
        return {"spec": runs.spec_table(self.base), "source": self.base.source,
                "grid": [[k, list(v)] for k, v in self.grid],
                "seeds": list(self.seeds) if self.seeds is not None else None,
                "backend": backend}


def expand(base: Spec, grid: Sequence[tuple[str, Sequence]], seeds: Sequence[int] | None = None
           ) -> tuple[Point, ...]:
    """The Cartesian product of the grid's axes (in order, the last varying fastest) and the
    seeds (fastest of all), each point's spec resolved and validated now: a bad value is a
    `SpecError` naming its ``--grid`` before anything trains."""
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key is swept twice: {', '.join(keys)}")
    if seeds is not None and "train.seed" in keys:
        raise SweepError("train.seed is both a --grid axis and --seeds: use one of them")
    names = short_names(keys + (["train.seed"] if seeds is not None else []))
    combos = list(itertools.product(*[v for _, v in grid]))
    seed_axis = list(seeds) if seeds is not None else [None]
    total = len(combos) * len(seed_axis)
    width = len(str(total - 1))
    points = []
    for values in combos:
        setting = tuple(zip(keys, values))
        for seed in seed_axis:
            index = len(points)
            overrides = [(k, v, f"--grid {k}={_short_value(v)}") for k, v in setting]
            if seed is not None:
                overrides.append(("train.seed", seed, f"--seeds (seed {seed})"))
            spec = load_spec(base, overrides)
            parts = [f"{names[k]}{_short_value(v)}" for k, v in setting]
            if seed is not None:
                parts.append(f"seed{seed}")
            name = f"{index:0{width}d}-" + ("-".join(parts) or "base")
            points.append(Point(index, name, setting, seed, spec))
    return tuple(points)


def _sweep_table(spec) -> tuple[dict, str | None]:
    """The [sweep] table of a spec file (empty for a Spec or a file without one)."""
    if isinstance(spec, Spec):
        return {}, None
    import tomllib

    path = resolve_spec_path(spec)
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh).get(SWEEP_TABLE, {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}, str(path)  # load_spec says what is wrong with the file
    if not isinstance(table, dict):
        raise SpecError(SWEEP_TABLE, table, "a table [sweep]", str(path))
    for key in table:
        if key not in SWEEP_KEYS:
            raise SpecError(f"{SWEEP_TABLE}.{key}", table[key], ", ".join(SWEEP_KEYS),
                            str(path))
    grid = table.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SpecError(f"{SWEEP_TABLE}.grid", grid, 'a table of dotted keys to non-empty lists '
                        '({ "objective.beta" = [0.5, 1, 2] })', str(path))
    return table, str(path)


def load_sweep(spec: str | Path | Spec, grid: Sequence[str] = (), seeds=None,
               overrides: Sequence = ()) -> Sweep:
    """The sweep of `spec` (a file, a bundled name or a `Spec`): its [sweep] table's grid and
    seeds, then `grid` ("KEY=V1,V2" strings; a key given here replaces the table's) and
    `seeds` (a count or a list; replaces the table's), `overrides` applied to every point."""
    table, _ = _sweep_table(spec)
    base = load_spec(spec, overrides)
    axes = {k: tuple(v) for k, v in table.get("grid", {}).items()}
    for text in grid:
        key, values = parse_grid(text)
        axes[key] = values
    seeds_value = seeds if seeds is not None else table.get("seeds")
    seed_axis = parse_seeds(seeds_value, base.train.seed) if seeds_value is not None else None
    if not axes and seed_axis is None:
        raise SweepError("nothing to sweep: give --grid KEY=V1,V2,… and/or --seeds N (or a "
                         "[sweep] table in the spec file)")
    options = {k: table[k] for k in ("engine", "workers", "vmap_size") if k in table}
    return Sweep(base, tuple(axes.items()), seed_axis, expand(base, list(axes.items()),
                                                             seed_axis), options)
