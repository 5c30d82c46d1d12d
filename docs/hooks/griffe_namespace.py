"""A griffe extension for the API pages: read `ppl_vae/numpyro/`, a package without __init__.py.

griffe (behind mkdocstrings) skips a folder without an __init__ module inside a regular package
(it takes it for scripts), but Python imports `ppl_vae.numpyro.elbo` from it as a namespace
portion. This visits its modules statically, as griffe visits any other, so the NumPyro
`ScaledELBO` is documented without importing jax. It is not needed once the folder has an
__init__.py.
"""

from __future__ import annotations

from pathlib import Path

import griffe

FOLDERS = ("numpyro",)


class NamespaceSubpackages(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "ppl_vae":
            return
        root = Path(pkg.filepath).parent
        for name in FOLDERS:
            folder = root / name
            if name in pkg.members or (folder / "__init__.py").exists():
                continue
            namespace = griffe.Module(name, filepath=folder, parent=pkg)
            pkg.set_member(name, namespace)
            for path in sorted(folder.glob("*.py")):
                module = griffe.visit(path.stem, path, path.read_text(), parent=namespace,
                                      docstring_parser=loader.docstring_parser,
                                      docstring_options=loader.docstring_options,
                                      lines_collection=loader.lines_collection,
                                      modules_collection=loader.modules_collection)
                namespace.set_member(path.stem, module)
