"""compress: recipe-driven model compression. `import compress` registers the checkpoint format with transformers."""

import compress.formats  # noqa: F401  (registers formats)
import compress.hf  # noqa: F401  (registers the transformers quantizer)
import compress.stages  # noqa: F401  (registers stages)
from compress.export import load

__all__ = ["load"]
__version__ = "0.1.0"
