"""vlmtune: fine-tune vision-language models on your own images and conversations."""

__version__ = "0.1.0"
