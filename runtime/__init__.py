"""llm-engine runtime: load an engine directory and serve it.

    from llm_engine.runtime import Engine, SamplingParams
    engine = Engine.load("engines/smollm2")
    print(engine.generate("Hello", SamplingParams(temperature=0, max_tokens=32))[0].text)

Imports neither `builder` nor networkx, onnx or transformers (a test enforces it)."""

from llm_engine.runtime.async_engine import AsyncEngine
from llm_engine.runtime.engine import Engine, EngineConfig
from llm_engine.runtime.engine_dir import EngineLoadError
from llm_engine.runtime.output import Output
from llm_engine.runtime.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineLoadError", "Output",
           "SamplingParams"]
