"""Transformers models of this package (one folder per model, as in `transformers/models`)."""
