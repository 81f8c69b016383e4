"""CUDA backend: the torch runtime with low-bit linears that run on the GPU (own Triton path or gemlite)."""
