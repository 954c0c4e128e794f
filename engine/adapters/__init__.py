"""Adapter tiers: host-resident parsed adapters and the device pool the kernels read."""
