"""A deleted namespace's pages below the pool (Admin.DeleteNamespace, kvstore/store/namespaces.py):
dropped from the host tier at once and from the disk tier through its writer, after any
write of them queued before (the writer applies its queue in order). Otherwise a namespace
created again under the same name and salt (the default salt is the name's), perhaps for
another tenant, would find the deleted one's KV (docs/security.md, "Quotas")."""

from __future__ import annotations

from kvstore.store.tiering.tiers import Tiers
from kvstore.tiers import PageKey


def purge(tiers: Tiers, namespace: str) -> tuple[int, int]:
    """(host pages dropped, disk pages queued for deletion) of `namespace`."""
    host = 0
    if tiers.host is not None:
        for key in tiers.host.keys():  # noqa: SIM118 (keys() is a snapshot: we remove as we go)
            if key.namespace == namespace:
                host += tiers.host.remove(key)
    disk: list[PageKey] = []
    if tiers.disk is not None:
        disk = tiers.disk.keys_of(namespace)
        disk += [k for k in tiers.queued if k.namespace == namespace]
        if disk:
            tiers.disk.remove_async(disk)
    return host, len(disk)
