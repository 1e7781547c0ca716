"""Command-line converters between checkpoint formats.

    python -m convert.export_llama2c SRC OUT.bin   # any checkpoint xllm loads -> llama2.c .bin
"""
