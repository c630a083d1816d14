"""The step backend: which one runs an engine's plan (`reference` torch ops, verified
`triton` kernels, or the `onnx` graph in onnxruntime on CPU) and the runner built for it.
Rank 0 (runtime.engine) and the other ranks (runtime.worker) both set up their step here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llm_engine.runtime.cluster import default_threads
from llm_engine.runtime.cpu_info import cpu_info
from llm_engine.runtime.engine_dir import EngineFiles, EngineLoadError
from llm_engine.runtime.kernel_check import bind_kernels, verify_kernels
from llm_engine.runtime.plan import PlanRunner

if TYPE_CHECKING:
    from llm_engine.runtime.engine import EngineConfig

BACKENDS = ("auto", "reference", "triton", "onnx")


def choose_backend(requested: str, device: str, files: Any = None) -> str:
    """The step backend. `files` (runtime.engine_dir.EngineFiles) is given for a single-rank
    engine, the only kind the ONNX fast path runs: "auto" picks it on CPU when the engine
    has a graph for its plan."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels={requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "onnx":
        if device != "cpu":
            raise EngineLoadError("kernels=onnx is the CPU backend; use triton on a GPU")
        why = "a multi-rank engine" if files is None else _onnx_unavailable(files)
        if why:
            raise EngineLoadError(f"kernels=onnx cannot run this engine: {why}; "
                                  "use kernels=reference")
        return requested
    if requested == "auto":
        if device.startswith("cuda"):
            return "triton"
        if files is not None and _onnx_unavailable(files) is None:
            return "onnx"
        return "reference"
    return requested


def _onnx_unavailable(files: Any) -> str | None:
    from llm_engine.runtime.onnx_backend import available

    return available(files.path, files.meta, files.plan)


def make_runner(files: EngineFiles, config: EngineConfig, backend: str, device: str,
                spinning: bool | None = None) -> PlanRunner:
    """The plan bound to this rank's weights and (triton backend) verified kernels, or
    (onnx backend) the engine's ONNX graph in an onnxruntime session."""
    # the plan's ops and weights first: an op this runtime lacks is "upgrade", not "tampered"
    runner = PlanRunner(files.plan, files.weights)
    sources = verify_kernels(files.path, files.plan)
    if backend == "onnx":
        from llm_engine.runtime.onnx_backend import OnnxRunner

        # onnxruntime's pool gets the cores; torch (sampling, KV stores, metadata) runs on the
        # calling thread, because two thread pools spinning on the same cores cost more than
        # torch's small per-step work gains from threads (measured: 46 -> 102 tok/s on 2 cores).
        runner = OnnxRunner(files.path, files.plan, config.threads or default_threads(1),
                            spinning)
        torch.set_num_threads(1)
        return runner
    if backend != "triton" and device == "cpu":
        return runner
    bound = bind_kernels(files.plan, sources, config.block_size) if backend == "triton" else {}
    weights = files.weights
    if device != "cpu":  # the mmapped file stays on the host; the GPU gets one copy
        weights = {k: v.to(device) for k, v in weights.items()}
    return PlanRunner(files.plan, weights, bound)


def backend_info(backend: str, runner: Any, device: str) -> dict[str, str]:
    """What the backend chose on this machine (threads, library, the CPU's ISA), for the
    `KV cache:` line of `engine run` and the backend_info metric of /metrics."""
    info = {"backend": backend, "device": device}
    if device == "cpu":
        cpu = cpu_info()
        info.update(cpu=cpu.model, isa=cpu.isa, physical_cores=str(cpu.physical_cores))
        info.update(getattr(runner, "settings", None) or
                    {"torch_threads": str(torch.get_num_threads())})
    return info


def describe_backend(info: dict[str, str]) -> str:
    """'onnx (onnxruntime 1.32.0, 2 threads, spinning on; AMD EPYC, 2 cores, avx2)'."""
    if info.get("device") != "cpu":
        return f"{info['backend']} on {info['device']}"
    if "onnxruntime" in info:
        how = (f"onnxruntime {info['onnxruntime']}, {info['threads']} threads, spinning "
               f"{info['spinning']}")
    else:
        how = f"torch, {info['torch_threads']} threads"
    return (f"{info['backend']} ({how}; {info['cpu']}, {info['physical_cores']} cores, "
            f"{info['isa']})")
