"""Triton kernels with torch reference twins, imported as ``k2ray.kernels``."""
