"""kvstore: a KV-cache store daemon for LLM inference workers."""

__version__ = "0.1.0"
