"""Jinja templates of the Triton kernels: one kernel family per file, `<family>.py.j2`.

A template renders to a self-contained Python module holding one `@triton.jit` kernel and a
`launch(...)` function. Rendering is deterministic (same template + parameters -> same bytes),
which is what lets the runtime re-render a kernel and compare it with the engine's copy.
"""

from pathlib import Path

DIR = Path(__file__).parent
