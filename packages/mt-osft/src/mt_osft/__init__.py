"""Orthogonal Subspace Fine-Tuning (SVD subspace training) for any torch module.

Not implemented yet: the package skeleton fixes the workspace layout."""
