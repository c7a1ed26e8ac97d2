import pytest
import torch

from compress.blockwise import run_stage
from compress.registry import StageEntry
from tests.conftest import build_model


class Context:
    def __init__(self, windows):
        self.calibration_windows = windows
        self.layers = {}


def recording_stage(seen: list, change=None) -> StageEntry:
    """A block-local stage that keeps the inputs each block received, then lets `change` modify the block."""

    def block(block, index, name, inputs, config, context):
        seen.append((index, name, [h.clone() for h in inputs.hidden]))
        if change is not None:
            change(index, block)

    return StageEntry("record", None, None, block=block, calibration_batch=lambda config: 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "bert"])
def test_block_by_block_reproduces_the_full_forward(family):
    model = build_model(family)
    windows = torch.randint(3, 320, (5, 24))
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True).hidden_states
    seen = []
    run_stage(model, recording_stage(seen), None, Context(windows))
    assert [index for index, _, _ in seen] == [0, 1]
    for index, _, hidden in seen:
        assert [h.shape[0] for h in hidden] == [2, 2, 1]
        torch.testing.assert_close(torch.cat(hidden), reference[index], rtol=1e-4, atol=1e-5)


def test_later_blocks_see_what_the_modified_block_outputs():
    model = build_model("llama")
    windows = torch.randint(3, 320, (2, 16))
    seen = []

    def zero_first_mlp(index, block):
        if index == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()

    run_stage(model, recording_stage(seen, zero_first_mlp), None, Context(windows))
    first_inputs = seen[0][2]
    with torch.no_grad():
        position = model.model.rotary_emb(first_inputs[0], torch.arange(16).unsqueeze(0))
        expected = model.model.layers[0](first_inputs[0], position_embeddings=position)
    torch.testing.assert_close(seen[1][2][0], expected, rtol=1e-4, atol=1e-5)
    assert seen[1][1] == "model.layers.1"
