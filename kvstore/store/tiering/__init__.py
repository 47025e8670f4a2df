"""What the store does with the tiers below the pools: demotion, promotion, prefetch, a swapped
sequence's private pages, flush and re-index; start at tiers.py (docs/tiers.md)."""
