"""Routing traces: the versioned on-disk format and the statistics computed from it."""
