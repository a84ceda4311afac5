"""GGUF files: reading, validation and the packed quantized weight leaf."""

from imp_jax.gguf.qtensor import QTensor, row_bytes
from imp_jax.gguf.quant import dequantize
from imp_jax.gguf.reader import ModelFile, TensorInfo, open_gguf

__all__ = ["ModelFile", "QTensor", "TensorInfo", "dequantize", "open_gguf", "row_bytes"]
