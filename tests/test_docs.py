"""The documentation site: a strict build, the generated reference, the README as a front
door, every code block of the tutorials and how-to guides run at smoke size (by a fork server,
tests/forkserver.py, that imports the frameworks once; the runners it is given are here), and
the built site in headless Chromium.

The conventions these tests enforce are written for authors in docs/contributing/docs.md.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import typing
from pathlib import Path

import pytest

from ppl_vae import spec as spec_module
from ppl_vae.cli import build_parser
from ppl_vae.reference import cli_reference_markdown, spec_keys, spec_reference_markdown
from tests import forkserver
from tests.forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHARED = ROOT.parent / "shared"
RUN_DIRS = ("tutorials", "how-to")  # the pages whose code blocks are executed
RUN_ALSO = ("reference/cli-behaviour.md",)  # and this one: its refusals are shown as they run
RUN_LANGS = ("bash", "python")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BUILD_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def _docs_tools() -> str | None:
    """Why the site cannot be built here, or None."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python", "mathjax")
               if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        return (f"the docs extra is not installed ({', '.join(missing)} missing): "
                "pip install -c constraints.txt -e '.[docs]' (make docs)")
    return None


needs_docs_tools = pytest.mark.skipif(_docs_tools() is not None, reason=str(_docs_tools()))


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(config), "-d", str(site)], cwd=ROOT, env=BUILD_ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    if _docs_tools():
        pytest.skip(_docs_tools())
    site = tmp_path_factory.mktemp("site")
    done = _build(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return site


# ---- the build ------------------------------------------------------------------------------
def test_the_site_builds_strictly_with_every_page_of_the_nav(built_site):
    nav = re.findall(r"^\s+- (?:.+: )?(\S+)\.md$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav) > 40, nav
    for page in nav:  # every page of the nav, the generated ones included
        html = "index.html" if page == "index" else f"{page.removesuffix('/index')}/index.html"
        assert (built_site / html).is_file(), html
    assert (built_site / "assets" / "mathjax" / "tex-chtml-full.js").is_file()
    figures = {p.name for p in (ROOT / "examples" / "figures").glob("*.png")}
    assert figures and figures == {p.name for p in (built_site / "assets" / "figures").iterdir()}
    api = (built_site / "reference" / "scaled-elbo" / "index.html").read_text()
    for name in ("ppl_vae.pyro.elbo.ScaledELBO", "ppl_vae.numpyro.elbo.ScaledELBO",
                 "ppl_vae.numpyro.elbo.ScaledELBO.with_weights"):
        assert f'id="{name}"' in api, name
    assert not (built_site / "hooks").exists()  # the build's own code is not published


MISTAKES = {
    "a broken link": ("[elsewhere](no-such-page.md)", "no-such-page.md"),
    "a missing anchor": ("[there](#no-such-heading)", "no-such-heading"),
    "a missing API reference": ("::: ppl_vae.no_such_function", "no_such_function"),
    "a missing snippet file": ('```toml\n--8<-- "models/no_such_model.toml"\n```',
                               "no_such_model.toml"),
}


BUILD_EACH = """
import json, logging, sys
from mkdocs.commands.build import build
from mkdocs.config import load_config

results = {}
for name, config_file, site in json.loads(sys.argv[1]):
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("mkdocs")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    ok = True
    try:  # as `mkdocs build` does it
        config = load_config(config_file, site_dir=site)
        config.plugins.on_startup(command="build", dirty=False)
        try:
            build(config)
        finally:
            config.plugins.on_shutdown()
    except BaseException as error:  # Abort in strict mode, or a plugin's own error
        ok = False
        messages.append(f"{type(error).__name__}: {error}")
    logger.removeHandler(handler)
    results[name] = {"ok": ok, "log": "\\n".join(messages)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def mistake_builds(tmp_path_factory):
    """{mistake: {ok, log}} of a two-page site with the site's own settings (INHERIT) and one
    planted mistake each (None: none), built in one process, one after another."""
    if _docs_tools():
        pytest.skip(_docs_tools())
    cases = []
    for mistake in (None, *MISTAKES):
        folder = tmp_path_factory.mktemp("mistake")
        docs = folder / "docs"
        docs.mkdir()
        (docs / "hooks").symlink_to(DOCS / "hooks")  # the griffe extension, by its relative path
        (docs / "index.md").write_text("# Home\n\n[the other page](other.md)\n\n## A heading\n")
        text, _ = MISTAKES.get(mistake, ("[home](index.md#a-heading)\n\n::: ppl_vae.fit", ""))
        (docs / "other.md").write_text(f"# Other\n\n{text}\n")
        config = folder / "mkdocs.yml"
        config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nhooks: []\n"
                          "watch: []\nextra_javascript: []\nnav: [index.md, other.md]\n")
        cases.append((str(mistake), str(config), str(folder / "site")))
    done = subprocess.run([sys.executable, "-c", BUILD_EACH, json.dumps(cases)], cwd=ROOT,
                          env=BUILD_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mistake", [None, *MISTAKES])
def test_a_broken_link_or_a_missing_reference_fails_the_build(mistake, mistake_builds):
    result = mistake_builds[str(mistake)]
    if mistake is None:
        assert result["ok"], result["log"]
    else:
        named = MISTAKES[mistake][1]
        assert not result["ok"] and named in result["log"], (
            f"{mistake} did not fail the build:\n{result['log']}")


# ---- the generated reference ----------------------------------------------------------------
def _spec_fields():
    """(dotted key, field, annotation) of every spec field, walked here independently."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            out.append((prefix + f.name, f, tp))
            if dataclasses.is_dataclass(tp) and tp not in seen:
                seen.add(tp)
                walk(tp, f"{prefix}{f.name}.")
            elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(
                    typing.get_args(tp)[0]) and typing.get_args(tp)[0] not in seen:
                seen.add(typing.get_args(tp)[0])
                walk(typing.get_args(tp)[0], f"{prefix}{f.name}[].")

    seen: set = set()
    walk(spec_module.Spec, "")
    return out


def _key_sections(markdown: str) -> dict[str, str]:
    """{dotted key: its section's text} of the generated spec page (### `key` headings)."""
    parts = re.split(r"^### `([^`]+)`.*$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _as_toml(value):
    if isinstance(value, tuple):
        return [_as_toml(v) for v in value]
    return value


def test_every_spec_field_is_in_the_reference_with_its_default_and_a_description():
    sections = _key_sections(spec_reference_markdown())
    fields = _spec_fields()
    assert len(fields) > 80  # the walk found the whole spec, not one table
    for key, f, tp in fields:
        assert key in sections, f"spec key {key} is missing from the generated reference"
        section = sections[key]
        description = section.split("\n\n")[2] if section.count("\n\n") >= 2 else ""
        assert description.strip(), (f"{key} has no description: give the field a docstring "
                                     "on the line after it in ppl_vae/schema.py")
        if dataclasses.is_dataclass(tp):
            continue  # a table: its keys have their own sections
        shown = re.search(r"default `([^`]*)`", section)
        assert shown, f"{key}: no default shown"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default) or (isinstance(default, tuple) and default
                                                 and dataclasses.is_dataclass(default[0])):
            continue
        assert tomllib.loads(f"v = {shown.group(1)}")["v"] == _as_toml(default), key
        for choice in f.metadata.get("choices", ()):
            assert f'`"{choice}"`' in section, f"{key}: allowed value {choice!r} not listed"


def test_the_registries_a_docstring_names_are_listed_with_their_values():
    sections = _key_sections(spec_reference_markdown())
    for value in spec_module.DATA_SOURCES + spec_module.SYNTHETIC_POPULATIONS:
        assert f'`"{value}"`' in sections["data.source"], value
    for value in spec_module.AUX_KINDS:
        assert f'`"{value}"`' in sections["objective.aux[].kind"], value


def test_the_default_spec_block_is_a_spec_equal_to_the_defaults():
    markdown = spec_reference_markdown()
    block = markdown.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = spec_module.spec_from_dict(tomllib.loads(block))
    assert spec == spec_module.Spec()


def test_the_cli_reference_has_every_command_and_option():
    markdown = cli_reference_markdown()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"models", "train", "eval", "sample", "compare", "plot"}
    for name, command in sub.choices.items():
        section = markdown.split(f"## `ppl-vae {name}`", 1)[1].split("\n## ", 1)[0]
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in section or f", {option}" in section, (name, option)


# ---- the README: the front door -------------------------------------------------------------
README = ROOT / "README.md"
GENERATED_PAGES = ("reference/spec.md", "reference/cli.md", "results/lecture-claims.md")


def _flat_keys(table: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    nav = (ROOT / "mkdocs.yml").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) > 20, links
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
        if link.startswith("docs/"):
            page = link.removeprefix("docs/")
            # a page of the site: in its nav, so the built site has it too
            assert re.search(rf"^\s+- (.+: )?{re.escape(page)}$", nav, re.M), (
                f"README links to {link}, which is not in the nav of mkdocs.yml")
            assert page not in GENERATED_PAGES, f"{link} is generated: it exists only in site/"


def test_the_readme_shows_no_hand_copied_key_block_and_its_spec_is_valid(tmp_path):
    """The keys live in the generated spec reference (tests above); the README shows one screen
    of a spec, which must be a valid spec, and not a copy of the keys."""
    blocks = re.findall(r"^```toml\n(.*?)^```", README.read_text(), re.M | re.S)
    assert blocks, "the README shows one screen of a spec"
    every_key = {k.key for k in spec_keys()}
    for block in blocks:
        keys = _flat_keys(tomllib.loads(block))
        assert len(keys) < len(every_key) / 3, (
            f"a README block lists {len(keys)} of the spec's {len(every_key)} keys: the keys "
            "belong in the generated spec reference (ppl_vae/reference.py), not in the README")
        path = tmp_path / "readme_spec.toml"
        path.write_text(block)
        spec_module.load_spec(path)


# ---- code blocks of the tutorials and how-to guides -----------------------------------------
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<what>.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    page: str  # relative to docs/
    line: int  # of the first line of code, 1-based
    lang: str
    code: str
    markers: list[str]

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a page, with the `<!-- test: ... -->` markers before each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        markers, j = [], i - 1
        while j >= 0 and MARKER.match(lines[j]):
            markers.insert(0, MARKER.match(lines[j]).group("what"))
            j -= 1
        indent, start = m.group("indent"), i + 1
        end = start
        while not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        code = textwrap.dedent("\n".join(lines[start:end]))
        blocks.append(Block(str(path.relative_to(DOCS)), start + 1, m.group("lang"), code + "\n",
                            markers))
        i = end + 1
    return blocks


def _available(resource: str) -> str | None:
    """Why `resource` is missing here, or None."""
    if resource == "mnist":
        return None if (SHARED / "data" / "mnist").is_dir() else f"needs MNIST in {SHARED}/data"
    if resource == "gpu":
        return None if shutil.which("nvidia-smi") else "needs a GPU (no nvidia-smi here)"
    if resource in ("ray", "mlflow", "tensorboard"):
        module = {"tensorboard": "tensorboardX"}.get(resource, resource)
        return None if importlib.util.find_spec(module) else f"needs {module} installed"
    return f"unknown resource {resource!r} in a test marker"


def skip_reason(block: Block) -> str | None:
    for marker in block.markers:
        if marker.startswith("skip"):
            return marker[4:].strip() or "marked skip"
        if marker.startswith("needs "):
            for resource in marker[6:].split(","):
                why = _available(resource.strip())
                if why:
                    return why
    return None


def _pages() -> list[Path]:
    return sorted([*(p for d in RUN_DIRS for p in (DOCS / d).glob("*.md")),
                   *(DOCS / page for page in RUN_ALSO)])


ALL_BLOCKS = [b for p in _pages() for b in extract_blocks(p)]
RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.lang in RUN_LANGS})
SKIPPED = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS and skip_reason(b)]


def test_the_pages_have_code_to_run_and_their_markers_are_known():
    assert len(RUN_PAGES) >= 10, RUN_PAGES
    for block in ALL_BLOCKS:
        for marker in block.markers:
            assert re.match(r"^(skip( .*)?|needs [\w, ]+|write \S+|replace \".*\" \".*\"|"
                            r"backend as written)$",
                            marker), f"{block.name}: unknown marker <!-- test: {marker} -->"
            if marker.startswith("needs "):
                for resource in marker[6:].split(","):
                    assert "unknown resource" not in str(_available(resource.strip())), marker


def test_toml_blocks_parse_and_written_specs_validate(tmp_path):
    for block in ALL_BLOCKS:
        if block.lang != "toml" or "--8<--" in block.code:
            continue
        tomllib.loads(block.code)  # a fragment must at least be TOML
        if any(m.startswith("write ") for m in block.markers):
            path = tmp_path / "spec.toml"
            path.write_text(block.code)
            spec_module.load_spec(path)


@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.name)
def test_code_block_that_needs_what_this_machine_lacks(block):
    pytest.skip(f"{block.name} ({block.lang}) not run: {skip_reason(block)}")


# ---- running them: one warm process forks a child per page and per command ------------------
#
# A page's commands start many Python processes (every `ppl-vae`, every `python examples/…`),
# and each would import torch, pyro, jax, matplotlib and arviz again: seconds apiece, most of
# the cost of a smoke-sized run. So each test process starts one fork server (tests/forkserver.py,
# with this file's RUNNERS) that imports them once and forks a child per request: a page (its
# python blocks in one namespace, its bash blocks in bash), a `ppl-vae` command of a bash block,
# or an example script whose command line is to be parsed. A tiny client on PATH sends the
# command's argv, working folder, environment and its stdin, stdout and stderr to the server,
# and exits with the child's exit code. A forked child starts as clean as a fresh process, so
# nothing is shared between commands.

#: What the server imports: the pages also track runs with MLflow and TensorBoard.
WARM_MODULES = (*forkserver.WARM_MODULES, "mlflow.tracking", "tensorboardX")
SMOKE_EVAL = ["--iwae-k", "10", "--particles", "1"]  # eval and sweep-report: small estimates


def smoke_overrides(spec) -> list[str]:
    """--set overrides that make a run of `spec` a smoke run (docs/contributing/docs.md): 5
    steps, 5 more per doubling of train.steps above 2000 (a resume to twice the steps stays
    longer), windows of 5 steps, minibatches of 32, evaluation and a checkpoint at the end only,
    300 examples a split (1000 drawn by a generated source), and the schedules a spec has shrunk
    to fit the run
    (each must end before it): an lr or β warm-up of 2 steps, a cyclical β of period 5 with a
    ramp of 2 (every smoke length is 0 mod 5), a capacity target reached at step 2. Every
    override but the steps is the same for any spec, so a resume may apply them again."""
    small = 5 * (1 + max(0, math.floor(math.log2(max(spec.train.steps, 1) / 2000))))
    out = [f"train.steps={small}", "train.log_every=5", "train.eval_every=1000",
           "train.checkpoint_every=1000", "train.batch_size=32", "data.limit=300"]
    if spec.data.source == "dsprites" or spec.data.source.startswith("synthetic:"):
        out.append("data.size=1000")
    if spec.train.lr_schedule.warmup:
        out.append("train.lr_schedule.warmup=2")
    beta = spec.objective.beta_schedule
    if beta.kind == "linear":
        out.append("objective.beta_schedule.warmup=2")
    elif beta.kind == "cyclical":
        out += ["objective.beta_schedule.warmup=2", "objective.beta_schedule.period=5"]
    if not spec.latents and spec.latent.capacity.max > 0:
        out.append("latent.capacity.steps=2")
    return out


def _smoke_cli(argv: list[str]) -> int:
    """`ppl-vae ARGV` at smoke size: train, compare and sweep get `smoke_overrides`; train and
    sweep run on Pyro (no XLA compilation) and a sweep one point after another in this process,
    unless the block is marked `backend as written`; eval and sweep-report small estimates."""
    from ppl_vae.cli import build_parser, main
    from ppl_vae.runs import recorded_spec
    from ppl_vae.spec import load_spec

    args, command = list(argv), argv[0] if argv else ""
    as_written = bool(os.environ.get("DOCS_BACKEND_AS_WRITTEN"))
    if command in ("train", "compare", "sweep"):
        parsed = build_parser().parse_args(args)
        source = (recorded_spec(parsed.spec) if Path(parsed.spec).is_dir() else parsed.spec)
        try:
            spec = load_spec(source, parsed.overrides)
        except Exception:  # noqa: BLE001 (a refusal the page shows: the command says it)
            return main(args)
        args += [word for o in smoke_overrides(spec) for word in ("--set", o)]
        if command in ("train", "sweep") and not as_written:
            args += ["--backend", "pyro"]
        if command == "sweep" and not as_written:
            args += ["--engine", "serial", "--no-progress"]
    elif command == "eval":  # either backend evaluates a run of either; Pyro compiles nothing
        args += [*SMOKE_EVAL, "--n", "100"] + ([] if as_written else ["--backend", "pyro"])
    elif command == "sweep-report":
        args += [*SMOKE_EVAL, "--no-progress"]
    return main(args)


def _parse_example(argv: list[str]) -> int:
    """`python examples/X.py ARGS`: run the script until its arguments are parsed, then stop.
    The page's command line is checked here; tests/test_examples.py runs every example with
    --smoke."""
    import argparse
    import runpy

    script, args = argv[0], argv[1:]
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, a=None, namespace=None):
        parse_args(self, a, namespace)
        print(f"{script}: its arguments {args} parse (tests/test_examples.py runs it)")
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    return 0


def _run_page(argv: list[str]) -> int:
    """A page's blocks in order (argv: the JSON file of `_prepare`d blocks): python blocks in
    one namespace, with `ppl_vae.fit` at smoke size; bash blocks in bash, whose `ppl-vae` and
    `python examples/…` come back to the server."""
    import ppl_vae
    import ppl_vae.training
    from ppl_vae.spec import load_spec

    real_fit = ppl_vae.training.fit

    def fit(spec, *args, **kwargs):  # ppl_vae.fit at smoke size
        spec = load_spec(spec)
        return real_fit(load_spec(spec, smoke_overrides(spec)), *args, **kwargs)

    ppl_vae.fit = ppl_vae.training.fit = fit
    namespace = {"__name__": "__main__"}
    start = time.monotonic()
    for block in json.loads(Path(argv[0]).read_text()):
        print(f"=== {block['name']} ({block['lang']}) at {time.monotonic() - start:.1f} s",
              flush=True)
        if block["write"]:
            Path(block["write"]).write_text(block["code"])
        elif block["lang"] == "python":
            code = "\n" * (block["line"] - 1) + block["code"]  # tracebacks name the page's lines
            exec(compile(code, block["page"], "exec"), namespace)
        else:
            keep = {"DOCS_BACKEND_AS_WRITTEN": "1"} if block["as_written"] else {}
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]],
                                  env={**os.environ, **keep})
            if done.returncode:
                print(f"{block['name']}: the bash block exited with {done.returncode}",
                      file=sys.stderr)
                return 1
        sys.stdout.flush()
    print(f"=== all blocks ran in {time.monotonic() - start:.1f} s", flush=True)
    return 0


def _run_cli(argv: list[str]) -> int:
    """`python -m ppl_vae.cli ARGV` as a program starts it (compare's two trainings, torchrun's
    workers): as it is, the smoke overrides already in ARGV."""
    from ppl_vae.cli import main

    sys.argv = ["ppl_vae.cli", *argv]
    return main(argv)


def _run_module(argv: list[str]) -> int:
    """`python -m MODULE ARGS` (torchrun: torch.distributed.run, whose workers come back here)."""
    import runpy

    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    return 0


RUNNERS = {"cli": _smoke_cli, "example": _parse_example, "page": _run_page, "raw-cli": _run_cli,
           "module": _run_module}
#: `python -m MODULE` that the server runs warm: the rest start a real interpreter.
WARM_PYTHON_MODULES = {"ppl_vae.cli": "raw-cli", "torch.distributed.run": "module"}

CLIENT = '''#!{python} -S
"""{what}: sent to the docs tests' fork server (tests/forkserver.py), which runs it in a warm
child process with this process's stdin, stdout and stderr; exits with its exit code."""
import json, os, socket, sys
kind, argv = {kind!r}, sys.argv[1:]
if kind == "python":  # python [-u …] -m ppl_vae.cli / torchrun / examples/X.py: warm; else real
    args = list(argv)
    while args[:1] and args[0] in ("-u", "-B", "-E", "-s", "-P"):
        args.pop(0)
    if args[:1] == ["-m"] and args[1:2] and args[1] in {modules!r}:
        kind, argv = {modules!r}[args[1]], args[2:] if args[1] == "ppl_vae.cli" else args[1:]
    elif args[:1] and args[0].startswith("examples/") and args[0].endswith(".py"):
        kind, argv = "example", args
    else:
        os.execv({python!r}, [{python!r}, *argv])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect({path!r})
request = {{"kind": kind, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
sock.recv(16)  # the child's pid
sys.exit(int(sock.recv(16) or b"1"))
'''


def _small_shared(target: Path, rows: int = 1000) -> Path | None:
    """A copy of ../shared for the pages at smoke size: its data sets linked, except MNIST, of
    which the first `rows` examples of each IDX file are written (a page's run reads 300 of
    them, and decompressing the 70 000 images would cost every MNIST command a second)."""
    if not SHARED.is_dir():
        return None
    (target / "data").mkdir(parents=True)
    for entry in SHARED.iterdir():
        if entry.name != "data":
            (target / entry.name).symlink_to(entry)
    for entry in (SHARED / "data").iterdir():
        if entry.name != "mnist":
            (target / "data" / entry.name).symlink_to(entry)
    mnist, small = SHARED / "data" / "mnist", target / "data" / "mnist"
    small.mkdir()
    for path in mnist.iterdir():
        name = path.name.removesuffix(".gz")
        if "idx" not in name:
            continue
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
            magic = fh.read(4)
            dims = struct.unpack(f">{magic[3]}I", fh.read(4 * magic[3]))
            size = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[magic[2]]
            keep = (min(rows, dims[0]), *dims[1:])
            body = fh.read(math.prod(keep) * size)
        (small / name).write_bytes(magic + struct.pack(f">{len(keep)}I", *keep) + body)
    return target


class DocsServer(ForkServer):
    """The fork server of one test process with this file's runners, its support folder (the
    clients on PATH, a small ../shared) and the environment pages run in."""

    def __init__(self, folder: Path):
        self.bin = folder / "bin"
        self.bin.mkdir(parents=True)
        self.shared = _small_shared(folder / "shared")
        env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               # XLA's CPU compiler at -O0: a smoke run's NumPyro time is compilation.
               # (XLA ignores the flags after a word it does not know, such as a bare
               # intra_op_parallelism_threads=1, which would hide the device count
               # `--devices` adds.)
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                            "--xla_backend_optimization_level=0 "
                            "--xla_llvm_disable_expensive_passes=true",
               "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
               # a child's sys.executable: what it starts with it comes back here too
               "DOCS_PYTHON": str(self.bin / "python")}
        super().__init__(folder, env, runners=__file__)
        for name, kind, what in (("ppl-vae", "cli", "ppl-vae at smoke size"),
                                 ("python", "python", "python -m ppl_vae.cli, torchrun, or "
                                  "examples/X.py (parsed only)")):
            (self.bin / name).write_text(CLIENT.format(
                python=sys.executable, path=self.socket, kind=kind, what=what,
                modules=WARM_PYTHON_MODULES))
            (self.bin / name).chmod(0o755)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = DocsServer(tmp_path_factory.mktemp("docs-server"))
    yield server
    server.close()


def _prepare(block: Block) -> dict:
    code, write = block.code, None
    for marker in block.markers:
        if marker.startswith("replace "):
            old, new = re.match(r'replace "(.*)" "(.*)"$', marker).groups()
            assert old in code, f"{block.name}: {old!r} of its replace marker is not in the block"
            code = code.replace(old, new)
        elif marker.startswith("write "):
            write = marker[6:].strip()
    return {"name": block.name, "page": block.page, "line": block.line, "lang": block.lang,
            "code": code, "write": write, "as_written": "backend as written" in block.markers}


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_code_blocks_of_a_page_run_at_smoke_size(page, tmp_path, fork_server):
    blocks = [_prepare(b) for b in ALL_BLOCKS if b.page == page and not skip_reason(b)
              and (b.lang in RUN_LANGS or any(m.startswith("write ") for m in b.markers))]
    if not any(b["lang"] in RUN_LANGS and not b["write"] for b in blocks):
        pytest.skip(f"{page}: every runnable block needs what this machine lacks")
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("models", "examples"):  # a working folder that looks like a checkout
        (work / name).symlink_to(ROOT / name)
    if fork_server.shared:
        (tmp_path / "shared").symlink_to(fork_server.shared)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    code, output = fork_server.run("page", [str(tmp_path / "blocks.json")], work, timeout=600)
    assert code == 0, f"a code block of docs/{page} failed (exit {code}):\n{output[-8000:]}"
    assert "=== all blocks ran" in output


# ---- the built site in a browser ------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    missing: list[str]

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if len(args) > 1 and str(args[1]) == "404":
            self.missing.append(str(args[0]))


@pytest.fixture(scope="module")
def served_site(built_site):
    handler = functools.partial(_QuietHandler, directory=str(built_site))
    _QuietHandler.missing = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", _QuietHandler.missing
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.skip(f"{path} is missing (make docs installs Debian's chromium and "
                        "chromium-driver as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the docs extra)")
    from selenium.common.exceptions import WebDriverException

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    except WebDriverException as err:
        pytest.skip(f"headless Chromium cannot start here: {err.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: d.execute_script(condition), message=f"timed out waiting for {what}")


@pytest.mark.slow
def test_the_math_renders_the_figures_load_and_the_search_finds_a_spec_key(served_site,
                                                                         browser):
    base, missing = served_site
    # the math: every formula of the lecture typeset by MathJax, none as a TeX error
    browser.get(base + "explanation/lecture/")
    formulas = browser.execute_script("return document.querySelectorAll('.arithmatex').length")
    assert formulas >= 20
    _wait(browser, "return document.querySelectorAll('.arithmatex mjx-container').length === "
                   "document.querySelectorAll('.arithmatex').length", "MathJax to typeset")
    assert browser.execute_script("return document.querySelectorAll('mjx-merror').length") == 0
    width = browser.execute_script(
        "return document.querySelector('.arithmatex mjx-container').getBoundingClientRect().width")
    assert width > 10
    # the figures: every image of the pages that show them decoded, with a width
    for page in ("results/lecture-claims/", "tutorials/first-vae/", "tutorials/m2/"):
        browser.get(base + page)
        _wait(browser, "return [...document.images].every(i => i.complete)", f"{page} images")
        sizes = browser.execute_script(
            "return [...document.querySelectorAll('article img')].map(i => [i.src, "
            "i.naturalWidth])")
        assert sizes, page
        assert all(w > 0 for _, w in sizes), [src for src, w in sizes if w == 0]
    # the search: a spec key finds its entry in the generated reference
    browser.get(base)
    browser.execute_script("document.querySelector('label.md-search__icon, "
                           "label[for=__search]').click()")
    box = browser.find_element("css selector", "input.md-search__input")
    box.send_keys("num_particles")
    _wait(browser, "return [...document.querySelectorAll('.md-search-result__link')]"
                   ".some(a => a.pathname.endsWith('/reference/spec/') "
                   "&& a.hash === '#objective-num_particles')",
          "the search to find objective.num_particles")
    assert missing == [], f"the site asked for files it does not have: {missing}"


def test_smoke_overrides_keep_a_resume_longer_than_its_first_run():
    for first, resumed in ((2000, 4000), (5000, 10000), (10000, 20000)):
        runs = [spec_module.load_spec("vae_digits", [f"train.steps={n}"]) for n in (first, resumed)]
        shrunk = [spec_module.load_spec(s, smoke_overrides(s)) for s in runs]
        assert shrunk[0].train.steps < shrunk[1].train.steps <= 40
        # a resume may change train.steps alone: every other override is the same
        assert smoke_overrides(runs[0])[1:] == smoke_overrides(runs[1])[1:]
    warm = spec_module.load_spec("vae_digits", ["train.lr_schedule={kind='cosine', warmup=500}"])
    assert spec_module.load_spec(warm, smoke_overrides(warm)).train.lr_schedule.warmup == 2

