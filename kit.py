#!/usr/bin/env python3
"""The kit's two commands. Needs only Python 3.10-3.12; sets up what is missing, then runs.

    python3 kit.py lab     # set up (first time only) and open JupyterLab on notebooks/
    python3 kit.py test    # set up (first time only) and run every test and every notebook

Setup makes a virtual environment in .venv/, installs requirements.txt (torch pinned) and
labkit itself (editable), and records a fingerprint of what it installed: a second run
with the same requirements installs nothing. Delete .venv/ to start over.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".labkit-installed"


def fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        h.update((ROOT / name).read_bytes())
    h.update(sys.version.split()[0].encode())
    return h.hexdigest()


def run(*cmd, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def setup() -> None:
    if not (3, 10) <= sys.version_info[:2] <= (3, 12):
        print(f"note: labkit is tested on Python 3.10-3.12; this is {sys.version.split()[0]}", file=sys.stderr)
    if not PYTHON.exists():
        print(f"creating a virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.read_text() == fingerprint():
        return  # already set up with these requirements
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-r", ROOT / "requirements.txt")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "-e", ROOT)
    STAMP.write_text(fingerprint())


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["VIRTUAL_ENV"] = str(VENV)
    e["MPLBACKEND"] = e.get("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return e


def lab() -> None:
    setup()
    args = ["--notebook-dir", ROOT / "notebooks"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # containers and cloud machines often run as root
    run(PYTHON, "-m", "jupyter", "lab", *args, env=env(), cwd=ROOT)


def test(extra: list[str]) -> None:
    setup()
    e = env()
    e["LABKIT_STATIC"] = "1"  # widgets draw once with their defaults under nbval
    e.pop("MPLBACKEND")
    run(PYTHON, "-m", "ruff", "check", "labkit", "tests", "tools", "benchmarks", "notebooks/src", env=e, cwd=ROOT)
    run(
        PYTHON, "-m", "pytest", "tests", "notebooks", "--nbval",
        "--sanitize-with", "notebooks/nbval_sanitize.cfg", "--nbval-cell-timeout", "600", *extra,
        env=e, cwd=ROOT,
    )  # fmt: skip


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("lab", "test", "setup"):
        print(__doc__)
        sys.exit(2)
    try:
        {"lab": lambda: lab(), "test": lambda: test(sys.argv[2:]), "setup": setup}[sys.argv[1]]()
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
