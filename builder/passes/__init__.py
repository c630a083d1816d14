"""Compiler passes over the IR graph: each a function (graph, options) -> (graph, PassReport)
in a file named for it; `builder/build.py`'s PASSES lists them in the order they run. A pass
too large for one file keeps its entry in `<name>.py` and its parts in `<name>_*.py`
(`lower_aten_ops.py`, `partition_attention.py`, ...)."""
