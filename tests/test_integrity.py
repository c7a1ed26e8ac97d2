"""Damaged checkpoints are refused with a message naming the file (and the tensor), before anything is loaded."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from compress import pipeline
from compress.cli import main
from compress.errors import CompressError
from compress.integrity import file_digests
from tests.conftest import tiny_recipe

WEIGHTS = "model.safetensors"
LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def checkpoint(model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoint") / "out"
    recipe = tiny_recipe(model_dirs["llama"], out, [{"stage": "nupes", "bits": 3, "group_size": 32}])
    pipeline.run(recipe, evaluate=False)
    return out


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def rehash(directory: Path) -> None:
    """Record the current files as if they had been exported so: only the structural checks can catch them."""
    report = json.loads((directory / "report.json").read_text())
    report["files"] = file_digests(directory)
    (directory / "report.json").write_text(json.dumps(report))


def refused(directory: Path, capsys, *needles: str) -> str:
    for command in (["verify", str(directory)], ["eval", str(directory)], ["inspect", str(directory)]):
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert "Traceback" not in error and error.startswith("error: ")
        for needle in needles:
            assert needle in error, (command, error)
    with pytest.raises(CompressError):
        compress.load(directory)
    return error


def rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def test_report_records_every_file_and_verify_accepts_it(checkpoint, capsys):
    files = json.loads((checkpoint / "report.json").read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"report.json"}
    assert {WEIGHTS, "config.json", "tokenizer.json", "recipe.yaml", "report.md"} <= set(files)
    assert all(len(record["sha256"]) == 64 for record in files.values())
    assert main(["verify", str(checkpoint)]) == 0
    compress.load(checkpoint)


def test_truncated_weights(copy, capsys):
    data = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(data[: len(data) - 1000])
    refused(copy, capsys, WEIGHTS, "truncated")
    rehash(copy)  # even with a matching record, the header no longer fits the file
    refused(copy, capsys, WEIGHTS, "truncated")


def test_one_flipped_bit(copy, capsys):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x10
    (copy / WEIGHTS).write_bytes(bytes(data))
    refused(copy, capsys, WEIGHTS, "altered")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", WEIGHTS])
def test_missing_file(copy, capsys, name):
    (copy / name).unlink()
    refused(copy, capsys, name, "missing")


def test_altered_config(copy, capsys):
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["layers"][LAYER]["bits"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    refused(copy, capsys, "config.json", "altered")
    rehash(copy)
    refused(copy, capsys, f"{LAYER}.qweight has shape [64, 48], the config makes it [64, 64]")


def test_wrong_shape(copy, capsys):
    rewrite_tensors(copy, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:, :2].contiguous()}))
    refused(copy, capsys, WEIGHTS)
    rehash(copy)
    refused(copy, capsys, f"{LAYER}.scales has shape [64, 2], the config makes it [64, 4]")


def test_wrong_dtype(copy, capsys):
    rewrite_tensors(copy, lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].to(torch.int16)}))
    rehash(copy)
    refused(copy, capsys, f"{LAYER}.qweight is stored as I16, the format stores U8")


def test_missing_and_extra_tensors(copy, capsys):
    def change(tensors):
        tensors.pop(f"{LAYER}.exponents")
        tensors["model.layers.0.extra"] = torch.zeros(3)

    rewrite_tensors(copy, change)
    rehash(copy)
    refused(copy, capsys, f"{LAYER}.exponents is missing", "model.layers.0.extra is not part of the model")


def test_corrupt_header(copy, capsys):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    (copy / WEIGHTS).write_bytes(bytes(data))
    rehash(copy)
    refused(copy, capsys, "a header of 1000000000000 bytes is larger than the 16 MiB")


def test_unknown_format_and_bad_settings(copy, capsys):
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["layers"][LAYER]["bits"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy)
    refused(copy, capsys, f"checkpoint layer {LAYER!r} has invalid power settings")
    config["quantization_config"]["layers"][LAYER]["format"] = "zip"
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy)
    refused(copy, capsys, "unknown format 'zip'")


def test_unverified_load_still_checks_the_header(copy, capsys):
    rewrite_tensors(copy, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:, :2].contiguous()}))
    with pytest.raises(CompressError, match="scales has shape"):
        compress.load(copy, verify=False)
    assert main(["eval", str(copy), "--no-verify"]) == 2
    assert "scales has shape" in capsys.readouterr().err


def test_no_record_means_no_verified_load(copy):
    (copy / "report.json").unlink()
    with pytest.raises(CompressError, match="no report.json, so its files cannot be verified"):
        compress.load(copy)
    compress.load(copy, verify=False)


def rewrite_header(path: Path, change) -> None:
    """Replace the safetensors header of `path` by `change(header)` (bytes), keeping the data after it."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    new = change(json.loads(data[8 : 8 + length]))
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])


def with_metadata(metadata):
    return lambda header: json.dumps({**header, "__metadata__": metadata}).encode()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (with_metadata({"format": "pt", "quant_method": "compress", "format_version": "99"}), "format_version '99'"),
        (with_metadata({"format": "pt", "quant_method": "compress", "format_version": 1}), "strings to strings"),
        (with_metadata({"format": ["pt"]}), "strings to strings"),
        (with_metadata({"format": "pt", "quant_method": "gptq"}), "quant_method 'gptq'"),
        (lambda header: b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (lambda header: b" " * (17 * 2**20), "larger than the 16 MiB"),
    ],
    ids=["version-99", "int-version", "list-value", "other-method", "deep", "17MiB"],
)
def test_a_tampered_header_is_refused(copy, capsys, change, needle):
    rewrite_header(copy / WEIGHTS, change)
    rehash(copy)
    refused(copy, capsys, needle)
