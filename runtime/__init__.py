"""llm-engine runtime: load an engine directory and run it.

Imports neither `builder` nor networkx, onnx or transformers (tests enforce it)."""
