"""AJPQ: joint pruning + mixed precision by hierarchical RL."""
