"""Diffusion maths, one concept per file (METHOD.md section 1)."""
