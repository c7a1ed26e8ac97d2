"""Compression stages. Importing this package registers every stage."""

from compress.stages import rtn  # noqa: F401
