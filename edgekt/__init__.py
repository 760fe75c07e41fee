"""edgekt: take a big neural network to a small device."""

__version__ = "0.1.0"
