"""cipo_lightning: RL with verifiable rewards for language models in PyTorch Lightning, built around CIPO."""

__version__ = "0.1.0"
