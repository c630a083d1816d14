"""Compiler passes over the IR graph: each a function (graph, options) -> (graph, PassReport)
in a file named for it; `builder/build.py`'s PASSES lists them in the order they run."""
