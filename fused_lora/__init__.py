"""fused_lora"""
