"""Weight-only INT8 / INT4 quantization (GLM-130B's scheme) and fast kernels. See docs/inference.md.

    from glm130b.quant import quantize_model
    from glm130b.checkpoint import load_model, save_model
    quantize_model(model, bits=4, group_size=128)      # swaps the four matrices of every layer
    quantize_model(model, bits=4, head_bits=8)         # ... and an INT8 output head (not GLM-130B's)
    save_model("runs/tiny-int4", model, tokenizer)
    model, tokenizer = load_model("runs/tiny-int4")    # never builds FP32 weights
    model, tokenizer = load_model("runs/tiny", bits=4) # quantized matrix by matrix while read
"""

from glm130b.quant.weights import (
    QUANTIZED_MODULES,
    SCHEME,
    DenseLinear,
    QuantizationError,
    QuantizedLinear,
    check_settings,
    dequantize_weight,
    pack_int4,
    quantization_info,
    quantize_head,
    quantize_model,
    quantize_weight,
    unpack_int4,
    use_fast_linears,
    weight_bytes,
)

__all__ = [
    "QUANTIZED_MODULES", "SCHEME", "DenseLinear", "QuantizationError", "QuantizedLinear", "check_settings",
    "dequantize_weight", "pack_int4", "quantization_info", "quantize_head", "quantize_model", "quantize_weight",
    "unpack_int4", "use_fast_linears", "weight_bytes",
]
