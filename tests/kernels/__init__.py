"""Tests of the Triton kernels against the torch reference (interpreted on CPU, native on CUDA)."""
