import pytest
import torch

from compress.formats.power import PowerLinear, decode
from compress.recipe import parse_recipe
from compress.solvers.power_search import search_exponent_and_clip
from compress.stages import nupes, rtn
from tests.conftest import build_model


class Context:
    def __init__(self, windows):
        self.calibration_windows = windows
        self.recipe = parse_recipe("stages:\n  - stage: rtn\n")
        self.layers = {}
        self.metrics = {}

    def record_layer(self, name, module, error):
        self.layers[name] = error


def test_search_finds_the_exponent_a_weight_was_made_with():
    """Weights that lie exactly on a power grid of exponent 0.55 are reproduced exactly only at 0.55."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (32, 64))
    codes[:, 0], codes[:, 1] = 0, 7  # each group spans the whole grid, so min/max recover its scale and zero
    scales = torch.full((32, 1), 2 / 7).half().float()
    zeros = torch.full((32, 1), 3)
    weight = decode(codes, scales, zeros, torch.tensor([0.55]), 64)
    exponent, clip = search_exponent_and_clip(
        weight, 3, 64, torch.linspace(0.4, 1.0, 13), torch.linspace(0.75, 1.0, 6), per_channel=False
    )
    assert float(exponent) == pytest.approx(0.55) and float(clip) == 1.0
    per_row, _ = search_exponent_and_clip(
        weight, 3, 64, torch.linspace(0.4, 1.0, 13), torch.linspace(0.75, 1.0, 6), per_channel=True
    )
    assert torch.allclose(per_row, torch.tensor(0.55))


def block_error(reference, model, windows):
    """Relative error of the first block's output on held-out windows, inputs from the original model."""
    with torch.no_grad():
        hidden = reference(input_ids=windows, output_hidden_states=True).hidden_states
        quantized = model(input_ids=windows, output_hidden_states=True).hidden_states
    return float((hidden[1] - quantized[1]).pow(2).sum() / hidden[1].pow(2).sum())


@pytest.mark.parametrize("bits", [2, 3])
def test_data_driven_beats_data_free_beats_rtn(bits):
    reference = build_model("llama")
    torch.manual_seed(1)
    calibration, held_out = torch.randint(3, 320, (16, 64)), torch.randint(3, 320, (8, 64))
    errors = {}
    for name, stage, config in [
        ("rtn", rtn, rtn.RtnConfig(bits=bits, group_size=32)),
        ("data-free", nupes, nupes.NupesConfig(bits=bits, group_size=32)),
        ("data-driven", nupes, nupes.NupesConfig(bits=bits, group_size=32, mode="data-driven", steps=16)),
    ]:
        model = build_model("llama")
        stage.apply(model, config, Context(calibration))
        errors[name] = block_error(reference, model, held_out)
    assert errors["data-driven"] < errors["data-free"] < errors["rtn"]


def test_learning_lowers_the_block_error_of_gptq_alone():
    reference = build_model("llama")
    torch.manual_seed(1)
    calibration, held_out = torch.randint(3, 320, (16, 64)), torch.randint(3, 320, (8, 64))
    errors = {}
    for steps in (0, 16):
        model = build_model("llama")
        nupes.apply(
            model, nupes.NupesConfig(bits=2, group_size=32, mode="data-driven", steps=steps), Context(calibration)
        )
        errors[steps] = block_error(reference, model, held_out)
        assert isinstance(model.model.layers[0].mlp.down_proj, PowerLinear)
    assert errors[16] < errors[0]


def test_per_channel_exponents():
    model = build_model("llama")
    nupes.apply(model, nupes.NupesConfig(bits=3, group_size=32, exponent_per="channel"), Context(None))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.exponents.shape == (128,) and len(torch.unique(layer.exponents)) > 1


def text_windows(tokenizer_dir, seed: int):
    """64 calibration windows from the first half of the embedded text, 16 held-out ones from its second half."""
    from transformers import AutoTokenizer

    from compress.data import consecutive_windows, embedded_text, random_windows, tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(tokenizer_dir), embedded_text()[:400_000])
    half = len(ids) // 2
    return random_windows(ids[:half], 64, 64, seed), consecutive_windows(ids[half:], 16, 64)


@pytest.mark.parametrize("seed", [1, 2])
def test_learning_moves_codes_and_beats_the_same_run_with_codes_frozen(tokenizer_dir, seed):
    """The learned codes really move at the default rate, and moving them lowers the held-out block error below
    that of the same run whose codes stay where GPTQ put them (learning_rate: 0; scales and exponents learn)."""
    reference = build_model("llama")
    calibration, held_out = text_windows(tokenizer_dir, seed)
    errors, contexts = {}, {}
    for name, rate in (("learned", nupes.NupesConfig().learning_rate), ("frozen", 0.0)):
        model = build_model("llama")
        contexts[name] = Context(calibration)
        config = nupes.NupesConfig(bits=2, group_size=32, mode="data-driven", steps=32, learning_rate=rate)
        nupes.apply(model, config, contexts[name])
        errors[name] = block_error(reference, model, held_out)
    learned = contexts["learned"].metrics
    assert 0.001 < learned["summary"]["codes_changed"] < 0.5
    assert contexts["frozen"].metrics["summary"]["codes_changed"] == 0
    assert errors["learned"] < errors["frozen"], errors
    for figures in learned["blocks"].values():  # each block reports its error on held-out and training batches
        assert figures["held_after"] < figures["held_before"] and figures["train_after"] < figures["train_before"]


def test_lazy_and_ordered_gptq_lower_the_block_error_of_static_gptq():
    reference = build_model("llama")
    torch.manual_seed(1)
    calibration, held_out = torch.randint(3, 320, (16, 64)), torch.randint(3, 320, (8, 64))
    errors = {}
    for name, options in (("static", {"gptq_groups": "static"}), ("lazy", {}), ("ordered", {"act_order": True})):
        model = build_model("llama")
        config = nupes.NupesConfig(bits=2, group_size=32, mode="data-driven", steps=0, **options)
        nupes.apply(model, config, Context(calibration))
        errors[name] = block_error(reference, model, held_out)
    assert errors["lazy"] < errors["static"] and errors["ordered"] < errors["static"], errors
