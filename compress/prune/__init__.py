"""Structured pruning: groups per architecture family (groups.py, architectures.py) and the physical removal of
zeroed groups with the per-block sizes a checkpoint records (structure.py)."""
