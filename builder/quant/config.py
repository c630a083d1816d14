"""The --quant family of build options as one checked value, and the policies that follow from
it: the weight format each mode stores, the rotation `auto` picks, group sizes.

`QuantConfig.from_options` is the only reader of the raw build options; the quantize pass and
its helpers take the typed config, never `getattr(options, ...)` or a mode's spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_engine.builder.errors import BuildError
from llm_engine.builder.quant.rotate import ROTATIONS
from llm_engine.kernels import formats
from llm_engine.kernels import quant as Q

MODES = ("int8-wo", "int8-sq", "fp8", "int4-awq", "int4-gptq")
KV_DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}
KV_QMAX = {"int8": Q.INT8_MAX, "fp8": Q.FP8_E4M3_MAX}
FP8_ACT_SCALES = ("static", "per-token", "per-token-group")
INT4_ZERO_POINTS = ("float", "integer")
INT4_MODES = ("int4-awq", "int4-gptq")
FORMAT = {"int8-wo": "int8_channel", "int8-sq": "int8_channel_a8", "fp8": "fp8_channel_a8",
          "int4-awq": "int4_group", "int4-gptq": "int4_group"}
TABLE_FORMAT = "int8_channel"
# Modes whose weights are rounded by GPTQ (error feedback through the calibration Hessian);
# int4-awq rounds to nearest within its searched scales and clip ranges.
GPTQ_MODES = ("int8-wo", "int8-sq", "fp8", "int4-gptq")
# 2048 tokens at the default length; 2 windows (1022 tokens) differed by up to 1.5 points of
# perplexity increase from a 16k-token measurement on held-out text.
HELDOUT_WINDOWS = 4
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
DEFAULT_GROUP = 128


def has_fp8() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def fp8_group_for(K: int, requested: int) -> int | None:
    """The activation group of an fp8_channel_a8_group GEMM with K inputs: the largest power
    of two <= `requested` that divides K, at least 32 (a GPU kernel's 8-bit dot takes 32
    columns at least; the group is its K tile). None if there is none."""
    g = 1 << (max(requested, 1).bit_length() - 1)
    while g >= 32:
        if K % g == 0:
            return g
        g //= 2
    return None


def group_size_for(K: int, requested: int) -> int:
    """`requested` if it divides K, else the largest power of two >= 32 below it that does
    (the sizes the fast kernels take), else the largest divisor that fits."""
    if K % requested == 0:
        return requested
    for g in INT4_KERNEL_GROUPS:
        if g < requested and K % g == 0:
            return g
    return Q.resolve_group_size(K, requested)


# What --rotation auto picks per mode: held-out perplexity increase on SmolLM2 (16k tokens,
# docs/performance.md) with none / offline / online. Rotation spreads activation outliers, which per-token
# int8 activations need; weight-only modes lose by it (their error then falls on every input
# channel alike instead of the quiet ones: int8-wo +0.07 -> +0.19, int4-awq +13.0 -> +23.0,
# int4-gptq +7.9 -> +7.7 with a worse build check), and e4m3's error is relative per value,
# which rotation does not shrink (fp8 +2.83 / +2.74 / +3.57; with per-token activation scales
# +1.90 / +2.84 / -: spreading an outlier over all channels loses its exactness as the row max).
AUTO_ROTATION = {"int8-wo": "none", "int8-sq": "online", "fp8": "none", "int4-awq": "none",
                 "int4-gptq": "none"}  # int8-sq: +0.98 / +0.47 / +0.17




@dataclass(frozen=True)
class QuantConfig:
    """The quantization a build does, checked (`from_options`: BuildError naming the flag)."""

    mode: str | None = None  # one of MODES
    kv_cache_dtype: str | None = None  # a key of KV_DTYPES
    group_size: int | None = None  # as given; None: DEFAULT_GROUP with silent fallbacks
    exclude: tuple[str, ...] = ()
    smoothquant_alpha: float | str = 0.5  # or "auto"
    rotation: str = "auto"  # as requested: none | offline | online | auto
    fp8_act_scales: str = "static"
    int4_zero_point: str = "float"
    calib_data: Path | None = None
    calib_samples: int = 8
    calib_seq_len: int = 512
    calib_cache: Path | None = None
    max_ppl_increase: float | None = None
    min_greedy_agreement: float | None = None
    tp: int = 1
    output: Path | None = None  # where the engine goes (a failed gate's report goes beside it)

    @classmethod
    def from_options(cls, options: Any) -> QuantConfig:
        """The config of build options (`builder.build.BuildOptions` or alike)."""
        names = cls.__dataclass_fields__
        given = {k: getattr(options, k) for k in names if hasattr(options, k)}
        given["mode"] = getattr(options, "quant", None)
        given["exclude"] = tuple(getattr(options, "quant_exclude", None) or ())
        config = cls(**given)
        config.check()
        return config

    @property
    def enabled(self) -> bool:
        return self.mode is not None or self.kv_cache_dtype is not None

    @property
    def weight_format(self) -> str | None:
        """The `linear` weight format (`kernels.formats`) the mode's GEMMs get."""
        if self.mode == "fp8":
            return {"per-token": "fp8_channel_a8_token",
                    "per-token-group": "fp8_channel_a8_group"}.get(self.fp8_act_scales,
                                                                   FORMAT["fp8"])
        return FORMAT.get(self.mode) if self.mode else None

    @property
    def integer_zeros(self) -> bool:
        return self.int4_zero_point == "integer"

    @property
    def group(self) -> int:
        return self.group_size or DEFAULT_GROUP

    @property
    def applied_rotation(self) -> str:
        """The rotation this build applies. The online rotation adds GEMMs inside the MLP
        that tensor parallelism would have to split by its blocks; with --tp it falls back to
        offline."""
        kind = self.rotation
        if kind == "auto":
            kind = AUTO_ROTATION.get(self.mode, "none")
        if kind == "online" and self.tp > 1:
            kind = "offline"
        return kind

    def check(self) -> None:
        """The --quant family of options, checked before any work."""
        mode, kv, g = self.mode, self.kv_cache_dtype, self.group_size
        if mode is not None and mode not in MODES:
            raise BuildError(f"--quant {mode!r} is not one of {', '.join(MODES)}")
        if kv is not None and kv not in KV_DTYPES:
            raise BuildError(f"--kv-cache-dtype {kv!r} is not one of {', '.join(KV_DTYPES)}")
        if (mode == "fp8" or kv == "fp8") and not has_fp8():
            raise BuildError(f"fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} "
                             "lacks; upgrade torch or use --quant int8-wo / --kv-cache-dtype "
                             "int8")
        if g is not None and (not isinstance(g, int) or g < 8):
            raise BuildError(f"--group-size {g} is too small; use a group of at least 8 input "
                             "channels, 32 for fp8 groups (128 is the usual choice)")
        alpha = self.smoothquant_alpha
        if alpha != "auto" and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
            raise BuildError(f"--smoothquant-alpha {alpha} is outside [0, 1]; pass a number in "
                             "[0, 1] or 'auto' (searched per layer)")
        self._check_rotation_and_scales()
        if g is not None and self.weight_format not in formats.GROUPED:
            what = f"--quant {mode}" + (f" --fp8-act-scales {self.fp8_act_scales}"
                                        if mode == "fp8" else "") \
                if mode else "a build without --quant"
            raise BuildError(f"--group-size sets int4 weight groups and fp8 per-token-group "
                             f"activation groups; {what} has none")
        if self.fp8_act_scales == "per-token-group" and g is not None and (g < 32 or g & (g - 1)):
            raise BuildError(f"--group-size {g}: fp8 activation groups are powers of two >= 32 "
                             "(the GPU kernel's K tile); use 32, 64 or 128")
        self._check_calibration_and_gates()

    def _check_rotation_and_scales(self) -> None:
        mode, rotation, act_scales = self.mode, self.rotation, self.fp8_act_scales
        if rotation not in (*ROTATIONS, "auto"):
            raise BuildError(f"--rotation {rotation!r} is not one of {', '.join(ROTATIONS)}, "
                             "auto")
        if mode is None and rotation not in ("none", "auto"):
            raise BuildError(f"--rotation {rotation} needs --quant: it prepares weights and "
                             "activations for quantization")
        if act_scales not in FP8_ACT_SCALES:
            raise BuildError(f"--fp8-act-scales {act_scales!r} is not one of "
                             f"{', '.join(FP8_ACT_SCALES)}")
        if self.int4_zero_point not in INT4_ZERO_POINTS:
            raise BuildError(f"--int4-zero-point {self.int4_zero_point!r} is not one of "
                             f"{', '.join(INT4_ZERO_POINTS)}")
        if self.int4_zero_point != "float" and mode not in INT4_MODES:
            raise BuildError(f"--int4-zero-point {self.int4_zero_point} needs --quant int4-awq "
                             "or int4-gptq")
        if self.exclude and mode is None:
            raise BuildError("--quant-exclude needs --quant: without it no weight is quantized")
        if act_scales != "static" and mode != "fp8":
            raise BuildError(f"--fp8-act-scales {act_scales} needs --quant fp8 (int8-sq's "
                             "activations are always per token)")

    def _check_calibration_and_gates(self) -> None:
        if self.calib_samples < 1 or self.calib_seq_len < 16:
            raise BuildError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
        if self.calib_data is not None and not Path(self.calib_data).is_file():
            raise BuildError(f"--calib-data {self.calib_data}: no such file")
        gates = (self.max_ppl_increase, self.min_greedy_agreement)
        if not self.enabled and any(v is not None for v in gates):
            raise BuildError("--max-ppl-increase / --min-greedy-agreement need --quant or "
                             "--kv-cache-dtype: there is nothing to measure")
        if self.min_greedy_agreement is not None and not 0 <= self.min_greedy_agreement <= 1:
            raise BuildError("--min-greedy-agreement is a fraction in [0, 1], e.g. 0.9")
