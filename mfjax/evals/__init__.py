"""Evaluation: metrics (`mfjax.evals.metrics`); k-NN, CKA and timing live beside it."""
