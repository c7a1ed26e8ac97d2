"""Compression stages. Importing this package registers every stage."""

from compress.stages import nupes, rtn  # noqa: F401
