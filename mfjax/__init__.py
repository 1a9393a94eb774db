"""mfjax: natural-domain foundation models for medical image classification, in JAX/Flax."""

__version__ = "0.1.0"
