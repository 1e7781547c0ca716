"""CUDA operators: not implemented yet.

The numba.cuda twins of the CPU kernels (same names and signatures as
`xllm.ops.reference`) land with the GPU issue. Until then
`xllm.ops.get_ops("cuda")` raises `DeviceNotAvailable`.
"""
