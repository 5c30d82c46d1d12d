"""The generated reference pages of the docs site: every spec key and every CLI argument.

One source of truth: the spec's keys come from the dataclasses in `ppl_vae.spec` (names, types
and defaults from `dataclasses.fields`, allowed values from each field's ``choices`` metadata and
from the registries its docstring names, descriptions from its attribute docstring, the string
literal on the line after the field); the command line comes from `ppl_vae.cli.build_parser`.
`docs/hooks/build.py` writes both pages at every build, and `tests/test_docs.py` checks that
every field appears with its default. Pure standard library: importing this module imports
neither torch nor jax.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import MISSING
from typing import Any, NamedTuple

from ppl_vae import spec as spec_module


class SpecKey(NamedTuple):
    """One key of a spec file: where it lives, what it holds and what it says."""

    key: str  #: dotted key as `--set` takes it, e.g. "objective.num_particles"; "latents[]."…
    table: str  #: the TOML header of its table, e.g. "[objective]" ("" for top-level keys)
    owner: type  #: the dataclass that declares the field
    name: str  #: the field's name
    type_text: str  #: "integer", "list of strings", "table", …
    default: Any  #: the field's default value (a dataclass instance for a table)
    allowed: tuple[str, ...]  #: allowed values as they are written in TOML ("" entries: none)
    doc: str  #: the attribute docstring ("" where the field has none)
    subtable: type | None  #: the dataclass of a table-valued field, else None


def field_docstrings(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of a dataclass, read from its source.

    Python drops a string literal that follows an annotated assignment, so it is read with `ast`,
    the way griffe and Sphinx's autodoc read attribute docstrings.
    """
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def registries() -> dict[str, tuple[str, ...]]:
    """The spec's registries: every tuple of strings named in capitals in `ppl_vae.spec`."""
    return {name: value for name, value in vars(spec_module).items()
            if name.isupper() and isinstance(value, tuple)
            and all(isinstance(v, str) for v in value)}


def _type_text(tp) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    if dataclasses.is_dataclass(tp):
        return "table"
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return "array of tables"
        return f"list of {names[item]}s"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(names[t] for t in typing.get_args(tp))
    return names[tp]


def toml_value(value) -> str:
    """A default as it is written in a spec file."""
    if dataclasses.is_dataclass(value):
        return "{…}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _allowed(f: dataclasses.Field) -> tuple[str, ...]:
    """The values a string key takes (its ``choices``), or the words a number key also takes."""
    return tuple(toml_value(c) for c in f.metadata.get("choices", f.metadata.get("words", ())))


def _expand_registries(doc: str) -> str:
    """Each registry a docstring names, `PRIOR_KINDS`, followed by its values."""
    for name, values in registries().items():
        listed = ", ".join(f"`{toml_value(v)}`" for v in values)
        doc = doc.replace(f"`{name}`", f"`{name}` ({listed})")
    return doc


def _escape_html(text: str) -> str:
    """`<` outside code spans as `&lt;`, so that "runs/<name>" is not read as an HTML tag."""
    parts = text.split("`")
    return "`".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(parts))


def spec_keys(cls: type = spec_module.Spec, prefix: str = "", table: str = "") -> list[SpecKey]:
    """Every key of a spec, depth first in declaration order (tables after the key naming them).

    A table declared by the same dataclass as an earlier one (the ``prior`` of a `[[latents]]`
    site, like the top-level `[prior]`) is listed once, under its first table.
    """
    out: list[SpecKey] = []
    seen: set[type] = set()

    def walk(cls, prefix, table):
        hints = typing.get_type_hints(cls)
        docs = field_docstrings(cls)
        nested = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            default = f.default if f.default is not MISSING else f.default_factory()
            sub = tp if dataclasses.is_dataclass(tp) else None
            array = typing.get_origin(tp) is tuple and dataclasses.is_dataclass(
                typing.get_args(tp)[0])
            if array:
                sub = typing.get_args(tp)[0]
            doc = docs.get(f.name, "")
            out.append(SpecKey(prefix + f.name, table, cls, f.name, _type_text(tp), default,
                               _allowed(f), doc, sub))
            if sub is not None:
                nested.append((sub, f.name, array))
        for sub, name, array in nested:
            if sub in seen:
                continue
            seen.add(sub)
            path = prefix + name
            header = f"[[{path.replace('[]', '')}]]" if array else f"[{path.replace('[]', '')}]"
            walk(sub, path + ("[]." if array else "."), header)

    walk(cls, prefix, table)
    return out


def _anchor(key: str) -> str:
    return key.replace("[].", "-").replace(".", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_anchor(header: str) -> str:
    return "table-" + (header.strip("[]").replace(".", "-") or "top")


def spec_reference_markdown() -> str:
    """The spec reference page (Markdown): a generated default spec, then every table's keys."""
    keys = spec_keys()
    tables: dict[str, list[SpecKey]] = {}
    for k in keys:
        tables.setdefault(k.table, []).append(k)
    header_of = {rows[0].owner: header for header, rows in tables.items()}  # by dataclass
    lines = [
        "# Spec reference",
        "",
        "<!-- Generated by ppl_vae/reference.py from the dataclasses of ppl_vae/schema.py at every "
        "docs build: edit the docstrings there, not this page. -->",
        "",
        "A spec is a TOML file (see `models/`) or the same frozen dataclasses built in Python "
        "(`ppl_vae.spec.Spec`). Every key has a default, so a spec says only what differs. On "
        "the command line, `--set table.key=value` overrides a key; the value is read as TOML "
        "(`[]`, `\"text\"`, `true`, `{kind = \"linear\", warmup = 500}`), a bare word is a "
        "string. A wrong key, type or kind is an error that names the file, the key, the value "
        "and what is allowed, before any data is loaded.",
        "",
        "!!! note \"Generated from the code\"",
        "    This page is written at every docs build from the dataclasses of "
        "`ppl_vae/schema.py` (which `ppl_vae.spec` re-exports): names, types and defaults "
        "from the fields, allowed values from their `choices` and the registries "
        "(`PRIOR_KINDS`, …), descriptions from each field's docstring. To change it, change "
        "the code.",
        "",
        "## Every key at its default",
        "",
        "```toml",
        *_default_toml(keys),
        "```",
        "",
    ]
    for header, rows in tables.items():
        title = header or "Top-level keys"
        lines += [f"## `{title}` {{ #{_table_anchor(header)} }}" if header
                  else f"## {title} {{ #{_table_anchor(header)} }}", ""]
        owner = rows[0].owner
        if owner.__doc__ and not owner.__doc__.startswith(owner.__name__ + "("):
            lines += [_escape_html(inspect.cleandoc(owner.__doc__)), ""]
        for k in rows:
            lines += [f"### `{k.key}` {{ #{_anchor(k.key)} }}", ""]
            facts = [f"**{k.type_text}**"]
            if k.subtable is None or k.type_text == "array of tables":
                facts.append(f"default `{toml_value(k.default)}`")
            if k.subtable is not None:
                first = header_of[k.subtable]
                facts.append(f"its keys: [`{first}`](#{_table_anchor(first)})")
            if k.allowed and "choices" in _field(k).metadata:
                facts.append("one of " + ", ".join(f"`{a}`" for a in k.allowed))
            elif k.allowed:
                facts.append("or " + ", ".join(f"`{a}`" for a in k.allowed))
            lines += [" · ".join(facts), ""]
            if k.doc:
                lines += [_escape_html(_expand_registries(k.doc)), ""]
    return "\n".join(lines).rstrip() + "\n"


def header_of(cls: type, keys: list[SpecKey]) -> str:
    """The TOML header under which the keys of dataclass `cls` are listed."""
    return next(k.table for k in keys if k.owner is cls).strip("[]")


def _field(k: SpecKey) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(k.owner) if f.name == k.name)


def _default_toml(keys: list[SpecKey]) -> list[str]:
    """The default spec as TOML, each key with its allowed values as a comment.

    Arrays of tables are empty by default, so their tables are shown commented out: one entry
    with every key at its default.
    """
    out: list[str] = []
    current, commented = None, False
    for k in keys:
        if k.table != current:
            current = k.table
            commented = k.table.startswith("[[")
            if out:
                out.append("")
            if k.table:
                out.append(("# " if commented else "") + k.table
                           + ("   (none by default; each entry:)" if commented else ""))
        if k.subtable is not None and k.type_text == "table":
            if commented:  # a table inside an array entry: name where its keys are
                line = f"{k.name} = {{ … }}"
                out.append(f"# {line:<28} # the keys of [{header_of(k.subtable, keys)}]")
            continue  # a table: its keys follow under its own header
        line = f"{k.name} = {toml_value(k.default)}"
        if k.allowed:
            words = " | ".join(a.strip('"') for a in k.allowed)
            line = f"{line:<28} # {words if 'choices' in _field(k).metadata else 'or ' + words}"
        out.append(("# " if commented else "") + line)
    return out


# ---- the command line -------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser,
                                                                     str]]:
    """{name: (sub-parser, its one-line help)} of the parser's sub-commands."""
    for action in parser._actions:  # argparse keeps sub-parsers in a private action
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (p, helps.get(name, "")) for name, p in action.choices.items()}
    return {}


def _usage(parser: argparse.ArgumentParser, width: int = 88) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=width)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument_row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._HelpAction):
        return None
    if action.option_strings:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
    else:
        name = action.metavar or action.dest
        if action.nargs in ("*", "+"):
            name += " …"
    notes = []
    if action.choices:
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0:
        notes.append(f"default `{action.default}`")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or ""):
        notes.append("repeatable")
    if action.required and action.option_strings:
        notes.append("required")
    help_text = (action.help or "").replace("%%", "%")
    if notes:
        help_text = f"{help_text} ({'; '.join(notes)})" if help_text else "; ".join(notes)
    return f"| `{_cell(name)}` | {_cell(_escape_html(help_text))} |"


def cli_reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The command-line reference page (Markdown), from `ppl_vae.cli.build_parser`."""
    if parser is None:
        from ppl_vae.cli import build_parser

        parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated by ppl_vae/reference.py from ppl_vae.cli.build_parser() at every docs "
        "build: edit the parser, not this page. -->",
        "",
        _escape_html(parser.description or ""),
        "",
        "!!! note \"Generated from the code\"",
        "    This page is written at every docs build from the argparse parser of "
        "`ppl_vae/cli.py`. `ppl-vae COMMAND --help` prints the same.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "Errors in a spec, the data or a run folder end the command with one line and exit "
        "code 2; set `PPL_VAE_DEBUG=1` for the full traceback. Ctrl-C exits with 130.",
        "",
    ]
    for name, (sub, help_text) in _subcommands(parser).items():
        summary = _escape_html(help_text[:1].upper() + help_text[1:] + ".")
        lines += [f"## `ppl-vae {name}` {{ #{name} }}", "", summary, "", "```text", _usage(sub),
                  "```", ""]
        rows = [r for r in (_argument_row(a) for a in sub._actions) if r]
        if rows:
            lines += ["| argument | what it does |", "| --- | --- |", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"
