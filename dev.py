#!/usr/bin/env python3
"""Set up a virtual environment in .venv and run the demo or the test suite.

  python3 dev.py demo   install quil-cluster and run a local demo cluster
  python3 dev.py test   install it with the test tools and run every test

Needs only Python 3.11+ with its venv and pip modules. Extra arguments go to
the demo (quil-coord demo) or to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    return python


def install(python: Path, extra: str) -> None:
    target = f".[{extra}]" if extra else "."
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target]
    subprocess.run(command, cwd=ROOT, check=True)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        print(f"error: Python 3.11 or newer is needed, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    python = venv_python()
    if argv[0] == "demo":
        install(python, "")
        command = [str(python), "-m", "quil_cluster.coordinator", "demo", *argv[1:]]
    else:
        install(python, "test")
        command = [str(python), "-m", "pytest", *argv[1:]]
    os.chdir(ROOT)
    # Replace this process, so signals such as SIGTERM from a service manager or
    # `timeout` reach the demo or pytest itself, which stop what they started.
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
