"""Generated malformed recipes and command lines: each ends in a clear error (exit code 2, no traceback, no
internal error) and leaves no output behind. `COMPRESS_FUZZ_SCALE` multiplies the number of cases (4400 by
default: 400 mutated recipes, which may load the tiny model, 2000 texts, 2000 command lines)."""

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.cli import main
from tests.conftest import TINY_DATA

SCALE = float(os.environ.get("COMPRESS_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 7, 8, 9, 16, 32, 48, 64, 128, 1024, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", ".", "..", "/", "(", "[a-", "\x00", "data-free", "data-driven", "rtn", "nupes", "Linear",
                     "embedded", "first", "packed", "dense", "missing.txt", "x.parquet", "../escape", "~", "1e999"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
FIELDS = [
    (), ("model",), ("model", "name"), ("model", "trust_remote_code"), ("seed",), ("data",), ("data", "calibration"),
    ("data", "calibration", "seq_len"), ("data", "calibration", "num_samples"), ("data", "calibration", "source"),
    ("data", "calibration", "half"), ("data", "evaluation", "num_windows"), ("data", "evaluation", "batch_size"),
    ("data", "evaluation", "seq_len"), ("data", "evaluation", "source"), ("stages",), ("stages", 0),
    ("stages", 0, "stage"), ("stages", 0, "bits"), ("stages", 0, "group_size"), ("stages", 0, "ignore"),
    ("stages", 0, "targets"), ("stages", 0, "mode"), ("stages", 0, "steps"), ("stages", 0, "min_exponent"),
    ("stages", 0, "exponent_candidates"), ("stages", 0, "damping"), ("stages", 1), ("export",),
    ("export", "format"), ("export", "out"), ("colour",), ("stages", 0, "colour"), ("data", "colour"),
]  # fmt: skip
DELETE = object()


def base_recipe(model_dir: Path, out: Path) -> dict:
    return {
        "model": str(model_dir),
        "data": copy.deepcopy(TINY_DATA),
        "stages": [{"stage": "nupes", "mode": "data-driven", "bits": 3, "group_size": 32, "steps": 2}],
        "export": {"out": str(out)},
    }


def mutate(recipe: dict, field: tuple, value) -> dict:
    if not field:
        return {} if value is DELETE else value
    target = recipe
    for part in field[:-1]:
        if isinstance(target, dict):
            target = target.setdefault(part, {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            return recipe
    last = field[-1]
    if isinstance(target, dict):
        if value is DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(target, list) and isinstance(last, int):
        if value is DELETE and last < len(target):
            del target[last]
        elif value is not DELETE:
            target[last : last + 1] = [value]
    return recipe


def clean_failure(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    # progress bars (loading weights) may come first on stderr; the error starts a line of its own
    start = captured.err.find("error: ")
    assert start == 0 or (start > 0 and captured.err[start - 1] in "\r\n"), captured.err
    return captured.err[start:]


@fuzz(400)
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(VALUES, st.just(DELETE))), min_size=1,
                          max_size=3))  # fmt: skip
def test_malformed_recipes(model_dirs, tmp_path_factory, capsys, mutations):
    work = tmp_path_factory.mktemp("fuzz")
    out = work / "out"
    recipe = base_recipe(model_dirs["llama"], out)
    for field, value in mutations:
        recipe = mutate(recipe, field, value)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    cwd = os.getcwd()
    os.chdir(work)  # a mutated export.out is relative to here, never to the repository
    try:
        code = main(["validate", str(path)])
        if code == 0:  # the mutations left a valid recipe: nothing to refuse
            capsys.readouterr()
            return
        clean_failure(capsys, code)
        clean_failure(capsys, main(["run", str(path), "--no-eval"]))
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml"], "a refused run left files behind"


@fuzz(2000)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_as_recipe(tmp_path_factory, capsys, text):
    work = tmp_path_factory.mktemp("text")
    path = work / "recipe.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if text.isascii() else text.encode("latin-1", "replace"))
    clean_failure(capsys, main(["validate", str(path)]))
    clean_failure(capsys, main(["run", str(path), "--out", str(work / "out")]))
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad")
    (work / "bad.yaml").write_text("stages: [{stage: rtn, bits: 99}]\n")
    (work / "notadir").write_text("x")
    return work


TOKENS = ["run", "validate", "eval", "inspect", "verify", "schema", "--set", "--model", "--out", "--format", "packed",
          "dense", "zip", "--force", "--no-eval", "--no-verify", "--json", "--data", "--num-windows", "-3", "0",
          "stages.0.bits=99", "stages.9.bits=3", "=", "a.b.c=[", "seed=-1", "missing.yaml", "{bad}/bad.yaml",
          "{bad}/notadir", "{bad}", "smollm2", "ü", "--half", "third"]  # fmt: skip


@fuzz(2000)
@given(argv=st.lists(st.sampled_from(TOKENS), max_size=6))
def test_malformed_command_lines(bad_files, capsys, argv):
    argv = [token.replace("{bad}", str(bad_files)) for token in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: usage errors exit with 2, --help with 0
        code = exit.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err
    if code == 0:
        assert argv and argv[0] == "schema", argv  # the only command here that can succeed
    else:
        assert code == 2, (argv, captured.err)
    assert sorted(p.name for p in bad_files.iterdir()) == ["bad.yaml", "notadir"]


CONFIG_FIELDS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "head_dim", "rms_norm_eps", "model_type", "architectures",
                 "torch_dtype", "tie_word_embeddings", "rope_theta", "quantization_config"]  # fmt: skip


@fuzz(150)
@given(mutations=st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(VALUES, st.just(DELETE))), min_size=1,
                          max_size=3))  # fmt: skip
def test_malformed_model_configs(model_dirs, tmp_path_factory, capsys, mutations):
    import json
    import shutil

    work = tmp_path_factory.mktemp("config")
    model = Path(shutil.copytree(model_dirs["llama"], work / "model"))
    config = json.loads((model / "config.json").read_text())
    for field, value in mutations:
        config = mutate(config, (field,), value)
    (model / "config.json").write_text(json.dumps(config))
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(model, work / "out")))
    code = main(["validate", str(recipe)])
    if code == 0:  # still a model the recipe fits
        capsys.readouterr()
        return
    clean_failure(capsys, code)
    clean_failure(capsys, main(["run", str(recipe), "--no-eval"]))
    assert sorted(p.name for p in work.iterdir()) == ["model", "recipe.yaml"], "a refused run left files behind"


@pytest.fixture(scope="module")
def fuzz_checkpoint(model_dirs, tmp_path_factory):
    from compress import pipeline
    from tests.conftest import tiny_recipe

    out = tmp_path_factory.mktemp("checkpoint") / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, [{"stage": "rtn", "bits": 4, "group_size": 32}]), evaluate=False)
    return out


HEADER_FIELDS = ["dtype", "shape", "data_offsets", "extra"]


@fuzz(300)
@given(
    tensor=st.integers(min_value=0, max_value=40),
    changes=st.lists(st.tuples(st.sampled_from(HEADER_FIELDS), st.one_of(VALUES, st.just(DELETE))), min_size=1,
                     max_size=3),
    metadata=st.one_of(st.none(), VALUES),
)  # fmt: skip
def test_malformed_safetensors_headers(fuzz_checkpoint, tmp_path_factory, capsys, tensor, changes, metadata):
    import json
    import shutil
    import struct

    from compress.integrity import file_digests

    work = Path(shutil.copytree(fuzz_checkpoint, tmp_path_factory.mktemp("header") / "ckpt"))
    weights = work / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    names = sorted(name for name in header if name != "__metadata__")
    entry = header[names[tensor % len(names)]]
    for field, value in changes:
        entry = mutate(entry, (field,), value) if isinstance(entry, dict) else entry
    header[names[tensor % len(names)]] = entry
    if metadata is not None:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    report = json.loads((work / "report.json").read_text())
    report["files"] = file_digests(work)  # as a tamperer who knows the format would: the header checks must catch it
    (work / "report.json").write_text(json.dumps(report))
    code = main(["verify", str(work)])
    if code == 0:
        capsys.readouterr()
        return
    clean_failure(capsys, code)
