"""Training: the population trainer (vectorised with torch.func), a plain reference loop, the recorder."""
