"""Compression stages. Importing this package registers every stage."""

from compress.stages import (  # noqa: F401
    allocate,  # noqa: F401  (after the stages it chooses among)
    head,
    hesso,
    jlcm,
    nupes,
    pv_tuning,
    rtn,
)
