"""What the daemon was built from and runs on, for operators: Stats `build`, the metric
`kvstore_build_info` and `kvstore-admin stats` (docs/observability.md).

The git commit is known at build: `setup.py`'s build step writes it into the package
(`_build_commit.txt`, in wheels and so in the Docker image). A source tree (an editable
install, a checkout on PYTHONPATH: pyproject.toml beside the package) has no such file;
there it is asked of git once, if the tree is a git checkout and git is installed. Else it is "" (unknown).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore import __version__

COMMIT_FILE = "_build_commit.txt"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class BuildInfo:
    version: str  # the kvstore package's
    git_commit: str  # "" when unknown
    python: str  # e.g. "3.11.7 (CPython)"
    grpc: str  # grpcio's version


@functools.cache
def build_info() -> BuildInfo:
    return BuildInfo(
        version=__version__,
        git_commit=git_commit(),
        python=f"{platform.python_version()} ({platform.python_implementation()})",
        grpc=grpc.__version__,
    )


def git_commit() -> str:
    try:
        return (_HERE / COMMIT_FILE).read_text().strip()
    except OSError:
        pass
    if not (_HERE.parent / "pyproject.toml").is_file():  # installed without the file: unknown
        return ""
    try:
        out = subprocess.run(
            ["git", "-C", str(_HERE), "rev-parse", "--verify", "--quiet", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return ""
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) in (40, 64) else ""
