"""gptnano: small language models written from scratch, trained with PyTorch Lightning."""

__version__ = "0.1.0"
