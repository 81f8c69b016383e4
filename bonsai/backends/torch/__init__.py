"""Torch reference backend: the transformer, VAE decoder and low-bit linear in plain PyTorch, any device."""
