"""Benchmarks: fused vs PEFT vs the addmm (Unsloth) chain vs the bare cuBLAS GEMM. ``python -m fused_lora.bench``."""
