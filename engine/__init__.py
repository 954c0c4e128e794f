"""loraplex engine runtime: model, scheduler, KV cache, adapter tiers (torch)."""
