"""Published SAE formats: Gemma Scope's params.npz tree and SAELens's safetensors + cfg.json."""
