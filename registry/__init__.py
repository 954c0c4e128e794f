"""loraplex adapter registry: metadata in SQL, weights in blob storage (no torch)."""
