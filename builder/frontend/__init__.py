"""Front end: find a model, read its weights tensor by tensor, trace it with torch.export."""

from llm_engine.builder.frontend.source import ModelSource, open_model
from llm_engine.builder.frontend.trace import Traced, trace_model

__all__ = ["ModelSource", "Traced", "open_model", "trace_model"]
