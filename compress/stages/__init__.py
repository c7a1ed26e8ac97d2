"""Compression stages. Importing this package registers every stage."""

from compress.stages import hesso, jlcm, nupes, pv_tuning, rtn  # noqa: F401
