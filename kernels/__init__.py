"""Batched LoRA math: one interface, a torch reference and Triton kernels."""
