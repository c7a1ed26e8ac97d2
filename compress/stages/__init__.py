"""Compression stages. Importing this package registers every stage."""

from compress.stages import hesso, nupes, pv_tuning, rtn  # noqa: F401
