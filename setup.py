"""The project is configured in pyproject.toml; this adds what it cannot declare yet (outside
setuptools' experimental table): the C loops of kvstore/hashing.py, of kvstore/quant, of the
zeroing of freed pool pages (kvstore/memory/page_zero.py) and of the client's page copy
(kvstore_client/_ntcopy.c), and the git commit a build is made from (kvstore/build_info.py
reads it). `pip install -e .` builds them; `make native` rebuilds them in place. All fall back
to Python (numpy) without them."""

import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPyWithCommit(build_py):
    """Writes kvstore/_build_commit.txt into the build (a wheel carries it); nothing without git."""

    def run(self) -> None:
        super().run()
        try:
            out = subprocess.run(
                ["git", "rev-parse", "--verify", "--quiet", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                cwd=Path(__file__).resolve().parent,
            )
        except (OSError, subprocess.SubprocessError):
            return
        package = Path(self.build_lib) / "kvstore"
        # (an editable install builds no package copy: the source tree asks git itself)
        if out.returncode == 0 and out.stdout.strip() and package.is_dir():
            (package / "_build_commit.txt").write_text(out.stdout.strip() + "\n")


setup(
    cmdclass={"build_py": BuildPyWithCommit},
    ext_modules=[
        Extension(
            "kvstore._chainhash",
            [
                "kvstore/_chainhash.c",
                "kvstore/_hashmemo.c",
                "kvstore/_pagetouch.c",
                "kvstore/_replyenc.c",
                "kvstore/_mrcrecord.c",
                "kvstore/_reqscan.c",
            ],
            depends=[
                "kvstore/_hashmemo.h",
                "kvstore/_pagetouch.h",
                "kvstore/_replyenc.h",
                "kvstore/_mrcrecord.h",
                "kvstore/_reqscan.h",
            ],
        ),
        # -ffp-contract=off: no fused multiply-add, so the results equal numpy's bit for bit;
        # -Wno-psabi: its 32-byte vectors never cross a non-inline call (GCC warns anyway).
        Extension(
            "kvstore._quant",
            ["kvstore/_quant.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
        ),
        # The client's page copies with streaming stores (AVX2 or SSE2 chosen at run time), and
        # with each page's XXH3-64 taken as it is copied (third_party/xxhash, vendored: its
        # internal stripe steps); kvstore_client/_pcopy.py copies with numpy without it.
        Extension(
            "kvstore_client._ntcopy",
            ["client/kvstore_client/_ntcopy.c"],
            include_dirs=["third_party/xxhash"],
            depends=["third_party/xxhash/xxhash.h"],
            extra_compile_args=["-O2"],
        ),
        # Zeroing freed pool pages with streaming stores (AVX2 or SSE2 chosen at run time);
        # kvstore/memory/page_zero.py zeroes with numpy without it.
        Extension("kvstore._ntzero", ["kvstore/_ntzero.c"], extra_compile_args=["-O2"]),
    ],
)
