"""Utility of a synthetic set: does pre-training a 3D ViT on it help on real data? (the ``utility`` stage)."""
