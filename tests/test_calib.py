import pytest
import torch

from compress.calib import iterate_blocks
from tests.conftest import build_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "bert"])
def test_block_by_block_reproduces_the_full_forward(family):
    model = build_model(family)
    windows = torch.randint(3, 320, (5, 24))
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True).hidden_states
    seen = 0
    for index, _, inputs in iterate_blocks(model, windows, batch_size=2):
        assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
        torch.testing.assert_close(torch.cat(inputs.hidden), reference[index], rtol=1e-4, atol=1e-5)
        seen += 1
    assert seen == 2


def test_later_blocks_see_what_the_modified_block_outputs():
    model = build_model("llama")
    windows = torch.randint(3, 320, (2, 16))
    hidden_into_second = None
    for index, block, inputs in iterate_blocks(model, windows, batch_size=2):
        if index == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()
            expected = inputs.run(block)
        else:
            hidden_into_second = inputs.hidden
    torch.testing.assert_close(hidden_into_second, expected)
