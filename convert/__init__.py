"""Command-line converters between checkpoint formats (each module's docstring has the details).

    python -m convert.export_llama2c SRC OUT.bin   # any checkpoint xllm loads -> llama2.c .bin
    python -m convert.export_hf SRC OUT_DIR        # any checkpoint xllm loads -> Hugging Face directory
"""
