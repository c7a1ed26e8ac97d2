"""Inference of compressed checkpoints: kernels that compute from the packed codes (kernels.cpp, built at `make
setup`), the pure-PyTorch reference of each, and `prepare`, which installs them once, at load."""

from compress.runtime.layers import prepare, release

__all__ = ["prepare", "release"]
