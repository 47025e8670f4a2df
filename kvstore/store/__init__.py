"""The one mutator of the daemon's metadata; start at store.py (docs/architecture.md, "Layers")."""
