"""Compressed-weight formats. Importing this package registers every format."""

from compress.formats import codebook, power, uniform  # noqa: F401
from compress.formats.base import QuantizedLinear

__all__ = ["QuantizedLinear"]
