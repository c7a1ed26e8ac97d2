"""The embedded models load from their packages (slow: run with `pytest -m slow`)."""

import pytest
import torch

from compress.models import find_blocks, find_linears, load_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "alias,kind,blocks,linears", [("smollm2-135m", "causal-lm", 30, 7), ("minilm-l6", "encoder", 6, 6)]
)
def test_embedded_alias_loads(alias, kind, blocks, linears):
    loaded = load_model(alias)
    assert loaded.kind == kind
    name, found = find_blocks(loaded.model)
    assert len(found) == blocks
    assert len(find_linears(found[0], ["Linear"], [], prefix=f"{name}.0")) == linears
    ids = torch.tensor([loaded.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids)[0]).all()
    assert not hasattr(loaded.model.config, "quantization_config")
