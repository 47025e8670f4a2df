"""What `--version` prints: the installed package's version and the wire API it speaks."""

from __future__ import annotations

from importlib import metadata

from kvstore_proto.kvstore.v1 import kvstore_pb2

WIRE_API = kvstore_pb2.DESCRIPTOR.package  # "kvstore.v1": the proto package is the API version


def package_version() -> str:
    """The `kvstore` distribution's version (pyproject.toml; the daemon's `kvstore.__version__`)."""
    try:
        return metadata.version("kvstore")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def version_line(prog: str) -> str:
    """e.g. 'kvstore-admin 0.1.0 (wire API kvstore.v1)'."""
    return f"{prog} {package_version()} (wire API {WIRE_API})"
