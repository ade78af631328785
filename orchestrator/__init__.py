"""Orchestration: the prefetch planner, the cache-policy simulator and the token scheduler (pure bookkeeping)."""
