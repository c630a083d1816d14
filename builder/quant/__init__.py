"""Weight-quantization algorithms (GPTQ, AWQ) producing the int4 group format of kernels.quant."""
