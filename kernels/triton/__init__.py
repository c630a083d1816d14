"""Triton kernel families: each module renders its template for given parameters and launches
the kernel with the same calling convention as the torch reference op in `kernels/ops.py`."""
