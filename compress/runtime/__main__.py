"""`python -m compress.runtime`: build the CPU kernels (compress/runtime/build.py)."""

import sys

from compress.runtime.build import main

sys.exit(main())
