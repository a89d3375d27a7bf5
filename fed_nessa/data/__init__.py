"""Data: per-device shards, embedding sets, synthetic fleets, data sources and extraction.

The bottom layer of the library: nothing here imports ``model``,
``evaluation``, ``federated`` or ``privacy``, so every other layer can read
data without pulling in training code.
"""
