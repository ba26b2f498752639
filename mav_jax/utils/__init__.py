"""Utilities that are not part of the model or the diffusion maths (file I/O)."""
