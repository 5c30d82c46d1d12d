"""MkDocs hooks of the ppl_vae site: what the build generates instead of keeping in docs/.

* `reference/spec.md` and `reference/cli.md`, from the code (`ppl_vae.reference`): the spec's
  dataclasses and the CLI's argparse parser, so the reference cannot drift from them;
* `results/lecture-claims.md`, from `examples/README.md` (the experiments' own report, beside
  the scripts that write its tables): the same text with headings the site can link to;
* `assets/figures/*.png`, the experiments' figures from `examples/figures/` (one copy, beside the
  scripts that draw them);
* `assets/mathjax/`, MathJax 3 from the `django-static-mathjax` package (the docs extra), so
  that the math renders with no network: the full TeX build (every extension preloaded) and its
  CommonHTML fonts, about 1.7 MB.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "examples" / "figures"
EXAMPLES_README = ROOT / "examples" / "README.md"
MATHJAX_FILES = ("tex-chtml-full.js",)
MATHJAX_FONTS = "output/chtml/fonts/woff-v2"


def mathjax_dir() -> Path:
    """The es5 folder of the installed MathJax (django-static-mathjax ships MathJax 3.2)."""
    try:
        import mathjax
    except ImportError:
        raise PluginError("the docs bundle MathJax from the docs extra: pip install -c "
                          "constraints.txt -e '.[docs]' (or make docs)") from None
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def lecture_claims_markdown(text: str) -> str:
    """examples/README.md as the site's results page.

    Each numbered heading "## N. Title (`script.py`)" becomes "## N. Title" with a fixed anchor
    (the slug of its title) and a line naming the script; links to a section (#N-…) follow it;
    figure paths point at the site's copies.
    """
    anchors = {}

    def heading(m):
        number, title, script = m.group(1), m.group(2), m.group(3)
        anchors[number] = slugify(f"{number}. {title}", "-")
        return (f"## {number}. {title} {{ #{anchors[number]} }}\n\n"
                f"Script: `examples/{script}`.")

    text = re.sub(r"^## (\d+)\. (.+?) \(`([\w.]+\.py)`\)$", heading, text, flags=re.M)
    text = re.sub(r"\]\(#(\d+)-[^)]*\)", lambda m: f"](#{anchors[m.group(1)]})", text)
    text = text.replace("](figures/", "](../assets/figures/")
    text = re.sub(r"^# .*$", "# The lecture's claims, measured", text, count=1, flags=re.M)
    note = ('!!! note "From examples/README.md"\n    This page is `examples/README.md`, the '
            "experiments' own report, rendered at every build: the scripts in `examples/` "
            "write its tables (`table.md` of each run).\n")
    title_end = text.index("\n") + 1
    return text[:title_end] + "\n" + note + text[title_end:]


def on_files(files, config):
    from ppl_vae.reference import cli_reference_markdown, spec_reference_markdown

    files.append(File.generated(config, "reference/spec.md", content=spec_reference_markdown()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference_markdown()))
    files.append(File.generated(config, "results/lecture-claims.md",
                                content=lecture_claims_markdown(EXAMPLES_README.read_text())))
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"assets/figures/{png.name}", abs_src_path=str(png)))
    es5 = mathjax_dir()
    paths = [es5 / name for name in MATHJAX_FILES] + sorted((es5 / MATHJAX_FONTS).glob("*.woff"))
    for path in paths:
        rel = path.relative_to(es5).as_posix()
        files.append(File.generated(config, f"assets/mathjax/{rel}", abs_src_path=str(path)))
    return files
