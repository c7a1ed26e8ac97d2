"""Compile compress/runtime/kernels.cpp into a library of PyTorch operators (`make setup` runs this).

    python -m compress.runtime

The library is built for this machine's processor (`-march=native`) against the installed torch; a sidecar file
records the source's digest and the torch version, and a library that no longer matches them is not loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "kernels.cpp"
LIBRARY = HERE / "_kernels.so"
STAMP = HERE / "_kernels.json"

log = logging.getLogger(__name__)


def identity() -> dict[str, str]:
    """What a built library must match: the source it was built from and the torch it links against."""
    import torch

    return {"source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "torch": torch.__version__}


def build() -> Path:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX", "g++")
    abi = int(torch.compiled_with_cxx11_abi())
    temporary = LIBRARY.with_name(LIBRARY.name + ".partial")
    command = [
        compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{path}" for path in include_paths()),
        f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(temporary),
        *(f"-L{path}" for path in library_paths()), *(f"-Wl,-rpath,{path}" for path in library_paths()),
        "-lc10", "-ltorch_cpu", "-ltorch",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    os.replace(temporary, LIBRARY)
    STAMP.write_text(json.dumps(identity(), indent=2) + "\n")
    return LIBRARY


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        log.info("built %s", build())
    except (OSError, subprocess.CalledProcessError) as error:
        log.error("error: the CPU kernels could not be built (%s); compressed layers will run the slower "
                  "pure-PyTorch path", error)  # fmt: skip
        return 1
    return 0
