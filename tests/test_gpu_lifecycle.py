"""Daemon stop and restart under a device pool (the fake device): clients learn it on the
KeepAlive stream, synchronize and close their mappings, and the daemon waits for that
before it frees the memory (with CUDA, freeing under an importer is undefined); a new
client maps the new epoch. Real daemon, real sockets."""

from __future__ import annotations

import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import prompt, wait_until
from kvstore_client.errors import KVStoreClientError

NS = "test"


@pytest.fixture
def device_daemon(daemon_factory, monkeypatch):
    monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "dev0")
    server = {"shutdown_grace_s": 10.0}  # the wait ends early once clients let go
    return daemon_factory(server=server, namespaces=[SMALL_NAMESPACE | {"device": "fake:dev0"}]).start()


def test_clients_let_go_before_the_daemon_frees_the_pool_and_map_the_new_epoch(device_daemon) -> None:
    d = device_daemon
    c = kvstore_client.connect(d.target, client_name="stays")
    try:
        ns = c.namespace(NS)
        seq = c.allocate(NS)
        for p in seq.append(prompt(8, seed=1)).writable_pages:
            ns.page(p.slot).fill_(3)
        seq.commit()
        old_epoch = ns.epoch
        assert not ns.pool.closed

        assert d.terminate() == 0
        # The stream's end closed the mapping (after a sync); the daemon saw no mapper left.
        wait_until(lambda: c.alive, lambda alive: not alive, timeout=30, what="the client to see the stop")
        assert ns.closed  # the library closed it on the stream's end
        log = d.stderr_text()
        assert "clients let go of the device pools" in log
        assert "still map it" not in log and "may still be mapped" not in log, log
        with pytest.raises(KVStoreClientError):
            c.allocate(NS)
    finally:
        c.close()

    d.start()
    with kvstore_client.connect(d.target) as c2:
        ns2 = c2.namespace(NS)
        assert ns2.epoch != old_epoch
        seq = c2.allocate(NS)
        for p in seq.append(prompt(8, seed=2)).writable_pages:
            ns2.page(p.slot).fill_(4)
        assert seq.commit().sealed_pages == 2
