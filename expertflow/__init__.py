"""ExpertFlow's model runtime (the GPU worker's package): model families, MoE model, engine, CLI."""
