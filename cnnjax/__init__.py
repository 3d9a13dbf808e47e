"""cnnjax: a JAX/Flax (linen) research library for convolutional networks."""

__version__ = "0.1.0"
