"""Where expert bytes live: checkpoint files, host tiers, the device hot-expert cache and its policies."""
