"""The `engine` command: build and inspect here; run/serve/bench come from the runtime.

Errors the user can act on print as one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from llm_engine.builder.errors import BuildError


class _RichUI:
    """Build progress: one line per stage with its time, a bar while weights stream."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/]…"):
            yield
        self.console.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - start:.1f}s)[/]")

    def counter(self, name: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        progress = Progress(TextColumn(f"  {name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), console=self.console,
                            transient=True)
        task = progress.add_task("", total=total)
        progress.start()

        def tick(item: str) -> None:
            progress.update(task, advance=1, description=item)
            if progress.tasks[0].finished:
                progress.stop()

        return tick

    def note(self, text: str) -> None:
        self.console.print(f"  [dim]{text}[/]")


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """llm-engine: compile a Hugging Face model into an engine, then run it."""


@main.command()
@click.option("--model", required=True, help="HF checkpoint dir, .gguf file, or a named model "
              "(smollm2).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Engine directory to write (default: engines/<model name>).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, help="Weight and activation dtype.")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest sequence (prompt + output); default: the model's limit.")
@click.option("--max-batch-tokens", type=int, default=2048, show_default=True,
              help="Tokens per step the engine's memory plan is sized for.")
@click.option("--disable-pass", "disabled", multiple=True,
              help="Skip an optional pass (fuse, quantize, plan_memory, codegen) or a fusion "
              "rule (fuse.rope, ...); repeatable.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Target device; with cuda on a GPU host, GEMM tilings are autotuned.")
@click.option("--quant", default=None, metavar="MODE",
              help="Quantize GEMMs: int8-wo (int8 weights), int8-sq (SmoothQuant W8A8), fp8 "
                   "(e4m3 W8A8, static activation scales), int4-awq, int4-gptq (4-bit groups).")
@click.option("--quant-exclude", multiple=True,
              help="Keep weights matching this pattern (fnmatch on weight name, HF module or "
                   "a parent module, e.g. 'lm_head') in full precision; repeatable.")
@click.option("--group-size", type=int, default=None,
              help="int4 weight groups and fp8 per-token-group activation groups (input "
                   "channels per scale; default 128); a layer it does not divide falls back to "
                   "the largest size that does.")
@click.option("--kv-cache-dtype", default=None, metavar="DTYPE",
              help="Store the KV cache as int8 or fp8 with per-head scales from calibration.")
@click.option("--smoothquant-alpha", default="0.5", show_default=True,
              help="int8-sq: how much of the activation range moves into the weights, in "
                   "[0, 1], or 'auto' to search it per layer on the calibration activations.")
@click.option("--rotation", default="auto", show_default=True,
              help="Rotate the model before quantizing: none, offline (residual stream and "
                   "heads, folded into the weights), online (also a block Hadamard before each "
                   "down projection at run time), or auto (the best measured for --quant).")
@click.option("--fp8-act-scales", default="static", show_default=True,
              help="fp8: scale the activations with one static per-tensor scale from "
                   "calibration, per-token (each token's own scale, computed at run time), or "
                   "per-token-group (one per token and --group-size input channels).")
@click.option("--int4-zero-point", default="float", show_default=True,
              help="int4: each group's zero point as a real number (the grid spans the "
                   "group's range exactly) or rounded to an integer (uint8; lower quality, "
                   "~11% faster batch-1 decode on the CPU fast path).")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Calibration text (.txt) or JSONL ({\"text\"} or {\"input_ids\"} lines); "
                   "default: English text that ships with Python.")
@click.option("--calib-samples", type=int, default=8, show_default=True,
              help="Calibration windows.")
@click.option("--calib-seq-len", type=int, default=512, show_default=True,
              help="Tokens per calibration window.")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PCT",
              help="Fail the build if held-out perplexity rises by more than PCT percent.")
@click.option("--min-greedy-agreement", type=float, default=None, metavar="FRAC",
              help="Fail the build if fewer than FRAC of held-out greedy tokens agree with the "
                   "unquantized model.")
@click.option("--tp", type=int, default=1, show_default=True,
              help="Tensor-parallel ranks: one plan and weight file per rank.")
@click.option("--pp", type=int, default=1, show_default=True,
              help="Pipeline stages: consecutive layers per rank.")
@click.option("--force", is_flag=True, help="Replace an existing engine at --output.")
def build(model, output, dtype, max_seq_len, max_batch_tokens, disabled, device, quant,
          quant_exclude, group_size, kv_cache_dtype, smoothquant_alpha, rotation,
          fp8_act_scales, int4_zero_point, calib_data,
          calib_samples, calib_seq_len, max_ppl_increase, min_greedy_agreement, tp,
          pp, force) -> None:
    """Compile MODEL into an engine directory."""
    from llm_engine.builder.build import BuildOptions, build_engine

    if output is None:
        output = Path("engines") / Path(model).name.removesuffix(".gguf")
    if smoothquant_alpha != "auto":
        try:
            smoothquant_alpha = float(smoothquant_alpha)
        except ValueError:
            _fail(f"--smoothquant-alpha {smoothquant_alpha!r} is not a number; pass a value "
                  "in [0, 1] or 'auto'")
    try:
        options = BuildOptions(model=model, output=output, dtype=dtype, max_seq_len=max_seq_len,
                               max_batch_tokens=max_batch_tokens,
                               disabled_passes=tuple(disabled), device=device, quant=quant,
                               quant_exclude=tuple(quant_exclude), group_size=group_size,
                               kv_cache_dtype=kv_cache_dtype,
                               smoothquant_alpha=smoothquant_alpha, rotation=rotation,
                               fp8_act_scales=fp8_act_scales,
                               int4_zero_point=int4_zero_point,
                               calib_data=calib_data,
                               calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                               max_ppl_increase=max_ppl_increase,
                               min_greedy_agreement=min_greedy_agreement, tp=tp, pp=pp,
                               force=force)
        start = time.perf_counter()
        path = build_engine(options, _RichUI())
    except BuildError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no engine was written")
    click.echo(f"built in {time.perf_counter() - start:.1f}s", err=True)
    click.echo(str(path))


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--graph", "graph_out", type=click.Path(path_type=Path), default=None,
              help="Draw the plan's graph to this file (.svg, .png or .dot).")
@click.option("--layers", type=int, default=1, show_default=True,
              help="With --graph: how many decoder layers to draw (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--kernels", "list_kernels", is_flag=True,
              help="List the rendered Triton kernels with the nodes each implements.")
@click.option("--onnx", "onnx_nodes", is_flag=True,
              help="Count the CPU fast path's ONNX nodes: per decoder layer and by op type.")
def inspect(engine_dir, graph_out, layers, as_json, list_kernels, onnx_nodes) -> None:
    """Summarise ENGINE_DIR: model, ops, fusions, weights, size."""
    from llm_engine.builder.inspect import InspectError, print_summary, summarize
    from llm_engine.builder.inspect_graph import draw_graph
    from llm_engine.builder.inspect_kernels import kernel_table, print_kernels
    from llm_engine.builder.inspect_onnx import onnx_summary, print_onnx

    try:
        if list_kernels:
            print_kernels(kernel_table(engine_dir), as_json=as_json)
            return
        if onnx_nodes:
            print_onnx(onnx_summary(engine_dir), as_json=as_json)
            return
        summary = summarize(engine_dir)
        print_summary(summary, as_json=as_json)
        if graph_out is not None:
            draw_graph(engine_dir, graph_out, layers=layers)
            click.echo(f"graph written to {graph_out}", err=True)
    except InspectError as e:
        _fail(str(e))


def _register_runtime_commands() -> None:
    from llm_engine.runtime.bench_cli import bench
    from llm_engine.runtime.cli import COMMANDS

    for command in [*COMMANDS, bench]:
        main.add_command(command)


_register_runtime_commands()

if __name__ == "__main__":
    main()
