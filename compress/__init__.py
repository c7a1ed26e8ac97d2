"""compress: recipe-driven model compression. `import compress` registers the checkpoint format with transformers.

`compress.run(recipe, model=..., calibration=..., out=...)` compresses (compress/api.py); `compress.load(path)`
loads a checkpoint."""

__version__ = "0.1.0"

import compress.formats  # noqa: E402, F401  (registers formats)
import compress.hf  # noqa: E402, F401  (registers the transformers quantizer)
import compress.stages  # noqa: E402, F401  (registers stages)
from compress.api import run  # noqa: E402
from compress.export import load  # noqa: E402

__all__ = ["load", "run"]
