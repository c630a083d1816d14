"""llm-engine: an ahead-of-time compiler and runtime for decoder-only language models.

    from llm_engine import Engine, SamplingParams
    engine = Engine.load("engines/smollm2")
    print(engine.generate("Hello", SamplingParams(temperature=0, max_tokens=32))[0].text)

The repository keeps its parts in top-level folders; the install maps each under this one
namespace, so no generic top-level name (`kernels`, `runtime`, ...) is ever claimed:

    builder/   -> llm_engine.builder    (engine build: trace, passes, codegen; imports HF)
    runtime/   -> llm_engine.runtime    (load and serve an engine; never imports the builder)
    kernels/   -> llm_engine.kernels    (torch references, the CPU paths, codegen helpers)
    templates/ -> llm_engine.templates  (the Jinja templates of the Triton kernels)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_engine.runtime import (
        AsyncEngine,
        Engine,
        EngineConfig,
        EngineLoadError,
        Output,
        SamplingParams,
    )

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineLoadError", "Output",
           "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import llm_engine.kernels.ops` runs this file first, and an eager import of the
    # runtime here would import the kernels half-initialized (and pay for torch in tools
    # that need only the templates).
    if name in __all__ and name != "__version__":
        from llm_engine import runtime
        return getattr(runtime, name)
    if name == "__version__":
        from llm_engine.runtime.engine_dir import runtime_version
        return runtime_version()
    raise AttributeError(f"module 'llm_engine' has no attribute {name!r}")
