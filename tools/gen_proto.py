"""Generate the Python gRPC code for proto/ into proto/kvstore_proto/.

The generated files are committed so that installing kvstore needs no protoc;
`--check` regenerates into a temporary directory and fails if the committed
files differ (run by `make test`). Never edit the generated files by hand.

The proto files are compiled under the virtual root `kvstore_proto/`, so the
generated modules import as `kvstore_proto.kvstore.v1.*` and never collide with
the daemon package `kvstore`; the protobuf package stays `kvstore.v1`.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = PROTO_DIR
PACKAGE = "kvstore_proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "kvstore").rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir; return the generated files relative to out_dir."""
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"{PACKAGE}/{f}" for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for path in sorted((out_dir / PACKAGE).rglob("*")):
        if path.is_dir():
            init = path / "__init__.py"
            init.touch()
    for path in sorted((out_dir / PACKAGE).rglob("*")):
        if path.is_file():
            generated.append(path.relative_to(out_dir))
    (out_dir / PACKAGE / "__init__.py").touch()
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT_DIR):
            print(f"wrote proto/{path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            str(rel)
            for rel in fresh
            if not (OUT_DIR / rel).exists() or not filecmp.cmp(Path(tmp) / rel, OUT_DIR / rel, shallow=False)
        ]
    if stale:
        print("generated gRPC code is stale; run `make proto`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated gRPC code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
