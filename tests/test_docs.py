"""The documentation site: a strict build, the generated reference, every code block of the
tutorials and how-to guides run at smoke size, and the built site in headless Chromium.

The conventions these tests enforce are written for authors in docs/contributing/docs.md.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import tomllib
import typing
from pathlib import Path

import pytest

from ppl_vae import spec as spec_module
from ppl_vae.cli import build_parser
from ppl_vae.reference import cli_reference_markdown, spec_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHARED = ROOT.parent / "shared"
RUN_DIRS = ("tutorials", "how-to")  # the pages whose code blocks are executed
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
    for page in ("index.html", "tutorials/first-vae/index.html", "reference/spec/index.html",
                 "reference/cli/index.html", "reference/api/index.html",
                 "reference/scaled-elbo/index.html", "explanation/lecture/index.html",
                 "results/lecture-claims/index.html", "results/mnist/index.html"):
        assert (built_site / page).is_file(), page
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


@needs_docs_tools
@pytest.mark.parametrize("mistake", [None, *MISTAKES])
def test_a_broken_link_or_a_missing_reference_fails_the_build(mistake, tmp_path):
    """The site's own settings (INHERIT), on a two-page site with one planted mistake."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hooks").symlink_to(DOCS / "hooks")  # the griffe extension, by its relative path
    (docs / "index.md").write_text("# Home\n\n[the other page](other.md)\n\n## A heading\n")
    text, named = MISTAKES.get(mistake, ("[home](index.md#a-heading)\n\n::: ppl_vae.fit", ""))
    (docs / "other.md").write_text(f"# Other\n\n{text}\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nhooks: []\n"
                      "watch: []\nextra_javascript: []\nnav: [index.md, other.md]\n")
    done = _build(config, tmp_path / "site")
    if mistake is None:
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        assert done.returncode != 0 and named in done.stdout + done.stderr, (
            f"{mistake} did not fail the build:\n{done.stdout}\n{done.stderr}")


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
                                     "on the line after it in ppl_vae/spec.py")
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
    if resource in ("ray", "mlflow"):
        return None if importlib.util.find_spec(resource) else f"needs {resource} installed"
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
    return sorted(p for d in RUN_DIRS for p in (DOCS / d).glob("*.md"))


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


SMOKE = '''
import math


def smoke_overrides(steps):
    """--set overrides for a smoke run of a spec asking for `steps` (docs/contributing/docs.md)"""
    small = 20 + steps // 500
    every = 10 * math.ceil(small / 10)
    return [f"train.steps={small}", "train.log_every=10", f"train.eval_every={every}",
            f"train.checkpoint_every={every}", "data.limit=500"]
'''

PPL_VAE_SHIM = '''#!{python}
"""ppl-vae at smoke size: train and compare get small --set overrides, eval small estimates, and
train runs on Pyro (no XLA compilation) unless the block is marked `backend as written`."""
import os
import sys

sys.path.insert(0, {here!r})
from smoke import smoke_overrides

from ppl_vae.cli import build_parser, main
from ppl_vae.spec import load_spec

args = sys.argv[1:]
if args and args[0] in ("train", "compare"):
    parsed = build_parser().parse_args(args)
    steps = load_spec(parsed.spec, parsed.overrides).train.steps
    args += [word for o in smoke_overrides(steps) for word in ("--set", o)]
    if args[0] == "train" and not os.environ.get("DOCS_BACKEND_AS_WRITTEN"):
        args += ["--backend", "pyro"]
elif args and args[0] == "eval":  # either backend evaluates a run of either; Pyro starts faster
    args += ["--iwae-k", "10", "--particles", "1", "--n", "100", "--backend", "pyro"]
sys.exit(main(args))
'''

PYTHON_SHIM = '''#!/bin/bash
# python, but an example script's command line is only parsed (tests/test_examples.py runs them)
case "$1" in
  examples/*.py) exec {python} {here}/parse_only.py "$@" ;;
  *) exec {python} "$@" ;;
esac
'''

PARSE_ONLY = '''
"""Run an example script until its arguments are parsed, then stop: the command line of a page
is checked here, and tests/test_examples.py runs every example at --smoke size."""
import argparse
import runpy
import sys

script, args = sys.argv[1], sys.argv[2:]
parse_args = argparse.ArgumentParser.parse_args


def parse_and_stop(self, argv=None, namespace=None):
    parse_args(self, argv, namespace)
    print(f"{script}: its arguments {args} parse (tests/test_examples.py runs it)")
    raise SystemExit(0)


argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
'''

DRIVER = '''
"""Run one page's code blocks in order: python blocks in one namespace, bash blocks in bash."""
import json
import os
import subprocess
import sys

sys.path.insert(0, {here!r})
from smoke import smoke_overrides

import ppl_vae
import ppl_vae.training
from ppl_vae.spec import load_spec

real_fit = ppl_vae.training.fit


def fit(spec, *args, **kwargs):  # ppl_vae.fit at smoke size
    spec = load_spec(spec)
    return real_fit(load_spec(spec, smoke_overrides(spec.train.steps)), *args, **kwargs)


ppl_vae.fit = ppl_vae.training.fit = fit
namespace = {{"__name__": "__main__"}}
for block in json.load(open(sys.argv[1])):
    print(f"=== {{block['name']}} ({{block['lang']}})", flush=True)
    if block["write"]:
        with open(block["write"], "w") as fh:
            fh.write(block["code"])
    elif block["lang"] == "python":
        code = "\\n" * (block["line"] - 1) + block["code"]  # tracebacks name the page's lines
        exec(compile(code, block["page"], "exec"), namespace)
    else:
        keep = {{"DOCS_BACKEND_AS_WRITTEN": "1"}} if block["as_written"] else {{}}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]],
                              env={{**os.environ, **keep}})
        if done.returncode:
            sys.exit(f"{{block['name']}}: the bash block exited with {{done.returncode}}")
print("=== all blocks ran", flush=True)
'''


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
def test_the_code_blocks_of_a_page_run_at_smoke_size(page, tmp_path):
    blocks = [_prepare(b) for b in ALL_BLOCKS if b.page == page and not skip_reason(b)
              and (b.lang in RUN_LANGS or any(m.startswith("write ") for m in b.markers))]
    if not any(b["lang"] in RUN_LANGS and not b["write"] for b in blocks):
        pytest.skip(f"{page}: every runnable block needs what this machine lacks")
    here = tmp_path / "support"
    bin_dir, work = here / "bin", tmp_path / "checkout"
    bin_dir.mkdir(parents=True)
    work.mkdir()
    for name in ("models", "examples"):  # a working folder that looks like a checkout
        (work / name).symlink_to(ROOT / name)
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    (here / "smoke.py").write_text(SMOKE)
    (bin_dir / "ppl-vae").write_text(PPL_VAE_SHIM.format(python=sys.executable, here=str(here)))
    (bin_dir / "python").write_text(PYTHON_SHIM.format(python=sys.executable, here=here))
    (here / "parse_only.py").write_text(PARSE_ONLY)
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    (here / "driver.py").write_text(DRIVER.format(here=str(here)))
    (here / "blocks.json").write_text(json.dumps(blocks))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           # (XLA ignores the flags after a word it does not know, such as a bare
           # intra_op_parallelism_threads=1, which would hide the device count `--devices` adds)
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(here / "driver.py"), str(here / "blocks.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = (done.stdout + done.stderr)[-8000:]
    assert done.returncode == 0, f"a code block of docs/{page} failed:\n{output}"
    assert "=== all blocks ran" in done.stdout


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
    namespace: dict = {}
    exec(SMOKE, namespace)
    first, resumed = (namespace["smoke_overrides"](n) for n in (5000, 10000))
    steps = [int(o.split("=")[1]) for o in (first[0], resumed[0])]
    assert steps[0] < steps[1] <= 40
    every = int(first[2].split("=")[1])
    assert every % 10 == 0 and every >= steps[0] and math.ceil(steps[0] / 10) * 10 == every
