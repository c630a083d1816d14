"""Compiler passes over the IR graph; `pipeline` runs them in order."""
