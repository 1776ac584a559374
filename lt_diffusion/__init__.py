"""lt-diffusion: diffusion models on long-tailed (class-imbalanced) data."""

__version__ = "0.1.0"
