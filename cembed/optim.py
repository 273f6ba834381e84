"""Placeholder: replaced by the optimizers work (issue 4)."""
