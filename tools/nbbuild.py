"""Build a notebook from a list of cells, then execute it in place (outputs committed).

Lab notebooks are written as small Python files of cells (``notebooks/src/NN_name.py``):
cells are separated by lines ``# %% [markdown]`` or ``# %%`` (the "percent" format that
VS Code, Spyder and jupytext read). This keeps the prose and code reviewable as text.

    python tools/nbbuild.py notebooks/src/00_welcome.py     # writes and runs notebooks/00_welcome.ipynb
    python tools/nbbuild.py --keep-timings notebooks/src/06_sparse_attention.py

Timings and plots of timings are only worth committing from a quiet machine: on a busy one,
two-thread matmuls slow down 6-50x. ``--keep-timings`` is for a rebuild on a busy machine when
only prose or deterministic cells changed: after executing, every ``# NBVAL_IGNORE_OUTPUT``
cell whose source is unchanged gets back the outputs of the notebook it replaces (say so in
the commit message; rebuild quietly when the code those cells time has changed). A notebook is built
beside its old self and replaces it only once it has run to the end, so a failed build changes nothing.
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


def build(src: Path, execute: bool = True, keep_timings: bool = False) -> Path:
    out = (src.parent.parent / (src.stem + ".ipynb")).resolve()
    previous = {}
    if keep_timings and out.exists():
        for cell in nbformat.read(out, as_version=4).cells:
            if cell.cell_type == "code" and cell.source.startswith("# NBVAL_IGNORE_OUTPUT"):
                previous[cell.source] = cell.outputs
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(src.read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    # built beside it and moved over it only once it ran to the end: a failed run leaves the committed
    # notebook (and the timings --keep-timings takes from it) as they were
    work = out.with_name(f".{out.stem}.building.ipynb")
    try:
        nbformat.write(nb, work)
        if execute:
            env = dict(os.environ, LABKIT_STATIC="1")
            subprocess.run(
                [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                 "--ExecutePreprocessor.timeout=600", str(work)],
                check=True, env=env, cwd=out.parent,
            )  # fmt: skip
        if previous:
            built = nbformat.read(work, as_version=4)
            kept = 0
            for cell in built.cells:
                if cell.cell_type == "code" and cell.source in previous:
                    cell.outputs = previous[cell.source]
                    kept += 1
            nbformat.write(built, work)
            print(f"kept the previous outputs of {kept} timing cells")
        os.replace(work, out)
    finally:
        work.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    keep = "--keep-timings" in sys.argv[1:]
    for arg in sys.argv[1:]:
        if arg != "--keep-timings":
            print(build(Path(arg), keep_timings=keep))
