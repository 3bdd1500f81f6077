"""Kimi K2 / DeepSeek-V3 model math in pure PyTorch (no Ray, no HTTP)."""
