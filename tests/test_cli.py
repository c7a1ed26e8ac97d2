import json
import subprocess
import sys

import pytest
import yaml

from compress.cli import main
from compress.errors import CompressError
from tests.conftest import TINY_DATA


def write_recipe(path, model_dir, stages, out):
    path.write_text(
        yaml.safe_dump({"model": str(model_dir), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}})
    )
    return path


def test_run_inspect_eval(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml", model_dirs["llama"], [{"stage": "rtn", "bits": 4, "group_size": 32}], out
    )
    assert main(["run", str(recipe), "--set", "stages.0.bits=3"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits per weight" in printed and "peak memory" in printed
    assert "bits: 3" in (out / "recipe.yaml").read_text()

    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["totals"]["layers"] == 14
    assert inspected["totals"]["bits_per_weight"] == pytest.approx(3 + 19 / 32)

    assert (
        main(
            [
                "eval",
                str(out),
                "--data",
                str(tmp_path / "r.yaml"),
                "--half",
                "all",
                "--seq-len",
                "32",
                "--num-windows",
                "2",
            ]
        )
        == 2
    )  # a .yaml file is no data source this tool reads
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    window = ["--data", str(text), "--half", "all", "--seq-len", "32", "--num-windows", "2"]
    assert main(["eval", str(out), *window, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["bits_per_weight"] == pytest.approx(3 + 19 / 32)
    assert result["size_bytes"] == (out / "model.safetensors").stat().st_size == inspected["totals"]["checkpoint_bytes"]
    assert result["size_bytes"] == json.loads((out / "report.json").read_text())["size"]["checkpoint_bytes"]
    assert "decode_tokens_per_second" in result and result["kl_to_original"] is None

    # any model, against any other with its tokenizer: a table, with KL, and no timing with --no-speed
    assert main(["eval", str(model_dirs["llama"]), *window, "--no-speed", "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert original["bits_per_weight"] is None and "decode_tokens_per_second" not in original
    assert main(["eval", str(out), *window, "--against", str(model_dirs["llama"]), "--no-speed"]) == 0
    table = capsys.readouterr().out
    assert "KL to " in table and "perplexity" in table and "{" not in table
    kl = float(table.split("(nats/token)")[1].split()[0])
    assert kl > 0
    assert main(["eval", str(model_dirs["llama"]), *window, "--against", str(model_dirs["llama"]), "--no-speed",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["kl_to_original"] == pytest.approx(0, abs=1e-3)  # float16 reference


def test_out_and_model_flags(model_dirs, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "not-used", [{"stage": "rtn", "group_size": 32}], tmp_path / "x")
    out = tmp_path / "elsewhere"
    assert main(["run", str(recipe), "--model", str(model_dirs["gpt2"]), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "x").exists()


BAD_RUNS = [
    ("stages:\n  - stage: quantum\n", [], "unknown stage"),
    ("stages:\n  - stage: rtn\n    bits: 12\n", [], "stages[0].bits"),
    ("stages:\n  - stage: rtn\n", ["--model", "/nonexistent/model"], "no such directory"),
    ("stages:\n  - stage: rtn\n", ["--set", "stages"], "expected KEY=VALUE"),
]


@pytest.mark.parametrize("text,extra,message", BAD_RUNS)
def test_bad_input_exits_2_without_traceback(tmp_path, text, extra, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_missing_recipe_and_checkpoint(tmp_path):
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    assert main(["eval", str(tmp_path)]) == 2


def test_missing_models_fail_at_once_and_say_what_to_do(tmp_path, monkeypatch, capsys):
    """No retried downloads for a name that is a missing local path, or a hub id that cannot be fetched."""
    import time

    from compress.models import hub_unreachable, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "first.yaml").write_text("stages:\n  - stage: rtn\nexport:\n  out: out/first\n")
    (tmp_path / "recipes" / "second.yaml").write_text("model: out/first\nstages:\n  - stage: rtn\n")
    started = time.perf_counter()
    assert main(["validate", "recipes/second.yaml"]) == 2
    message = capsys.readouterr().err
    assert "'out/first': no such directory" in message and "run `compress run recipes/first.yaml` first" in message
    with pytest.raises(CompressError, match="not in the local cache"):
        resolve_model("someone/not-cached-model")  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(CompressError, match="not a hub id"):
        resolve_model("a b c")
    assert time.perf_counter() - started < 10
    assert hub_unreachable("https://hub.invalid") is not None


def test_version_and_verbose_after_the_command(capsys):
    from compress import __version__
    from compress.cli import _parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"compress {__version__}"
    assert _parser().parse_args(["validate", "r.yaml", "-v"]).verbose
    assert _parser().parse_args(["-v", "validate", "r.yaml"]).verbose
    assert not _parser().parse_args(["validate", "r.yaml"]).verbose
