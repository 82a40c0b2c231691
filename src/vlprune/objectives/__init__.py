"""Training objectives (pure loss functions)."""
