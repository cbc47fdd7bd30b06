"""Build a notebook from a list of cells, then execute it in place (outputs committed).

Lab notebooks are written as small Python files of cells (``notebooks/src/NN_name.py``):
cells are separated by lines ``# %% [markdown]`` or ``# %%`` (the "percent" format that
VS Code, Spyder and jupytext read). This keeps the prose and code reviewable as text.

    python tools/nbbuild.py notebooks/src/00_welcome.py     # writes and runs notebooks/00_welcome.ipynb
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat


def parse(source: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text.strip():
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(src: Path, execute: bool = True) -> Path:
    out = (src.parent.parent / (src.stem + ".ipynb")).resolve()
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, out)
    if execute:
        env = dict(os.environ, LABKIT_STATIC="1")
        subprocess.run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
             "--ExecutePreprocessor.timeout=600", str(out)],
            check=True, env=env, cwd=out.parent,
        )  # fmt: skip
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(build(Path(arg)))
