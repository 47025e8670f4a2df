"""Rewrite docs/config.md from the config definition table (kvstore/config_docs.py)."""

from pathlib import Path

from kvstore.config_docs import markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    path.write_text(markdown())
    print(f"wrote {path}")
