"""Eviction policies by name. Importing this package registers the built-in ones."""

from kvstore.policy import arc, horizon, lfu, lru, s3fifo  # noqa: F401  (registers them)
from kvstore.policy.base import EvictionPolicy, make_policy, policy_names

__all__ = ["EvictionPolicy", "make_policy", "policy_names"]
