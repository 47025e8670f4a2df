"""Client programs: `kvstore-admin` (admin.py, with explain and mrc in admin_explain.py).
They talk to the daemon over gRPC through `kvstore_client` only, like any other client."""
