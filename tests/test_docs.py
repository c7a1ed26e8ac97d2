"""The figures in the docs are the scripts' own: every generated section and every results.md is what its script
renders from the committed results.json, so a number edited by hand, or left from an earlier run, fails here."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # the scripts import each other as scripts do
    try:
        spec = importlib.util.spec_from_file_location(f"_docs_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def section(page: str, marker: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    found = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.DOTALL)
    assert found, f"docs/{page} has no {marker} section"
    return found.group(1)


# (results directory under bench/, script, its renderer, the docs page and marker of its section, if any)
GENERATED = [
    ("", "bench", "markdown_table", "benchmark.md", "bench"),
    ("quick", "bench", "markdown_table", "benchmark.md", "bench-quick"),
    ("nupes-w3", "bench", "markdown_table", None, None),
    ("calibration", "bench", "markdown_table", "benchmark.md", "bench-calibration"),
    ("allocate", "bench", "markdown_table", "benchmark.md", "bench-allocate"),
    ("decode", "bench_decode", "table", "runtime.md", "decode-bench"),
    ("scale", "bench_scale", "markdown", "operations.md", "scale-bench"),
    ("offload", "bench_offload", "markdown", "operations.md", "offload-bench"),
    ("prune", "bench_prune", "markdown", "pruning.md", "prune-bench"),
]


@pytest.mark.parametrize("directory, name, renderer, page, marker", GENERATED, ids=[g[0] or "main" for g in GENERATED])
def test_results_and_docs_are_what_the_script_renders(directory, name, renderer, page, marker):
    results_dir = ROOT / "bench" / directory
    if not (results_dir / "results.json").is_file():
        pytest.skip(f"bench/{directory} has no results yet")
    rendered = getattr(script(name), renderer)(json.loads((results_dir / "results.json").read_text()))
    assert (results_dir / "results.md").read_text() == rendered, f"bench/{directory}/results.md"
    if page is not None:
        assert rendered.strip() in section(page, marker), f"docs/{page} {marker}"


def test_the_readme_table_is_what_bench_quick_rendered():
    path = ROOT / "bench" / "quick" / "results.json"
    if not path.is_file():
        pytest.skip("bench/quick has no results yet")
    rendered = script("bench").headline_table(json.loads(path.read_text()))
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- bench-quick:start -->\n(.*?)<!-- bench-quick:end -->", text, re.DOTALL)
    assert found and found.group(1) == rendered, "README.md bench-quick: python scripts/bench.py --table-only ..."


def test_every_docs_page_is_reachable_from_the_readme():
    seen, queue = set(), [ROOT / "README.md"]
    while queue:
        page = queue.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            queue.append((page.parent / target).resolve())
    pages = {path.resolve() for path in (ROOT / "docs").rglob("*.md")}
    assert not pages - seen, f"not linked from README.md or a page it links: {sorted(pages - seen)}"


def test_the_recipe_reference_is_what_the_schema_renders():
    from compress.recipe import json_schema

    rendered = script("recipe_reference").render(json_schema())
    assert (ROOT / "docs" / "reference.md").read_text() == rendered, "run python scripts/recipe_reference.py"


def _numbers(value):
    """Every number in a results file: values, and numbers inside strings (notes, commands)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)
    elif isinstance(value, str):
        yield from (float(found) for found in re.findall(r"\d+\.\d+|\d+", value))


# The results each page may quote, under bench/; numbers of settings (in backticks, or recipe and option values)
# are not measurements and are not checked.
PAGES = {
    "README.md": ["", "quick"],
    "docs/benchmark.md": ["", "quick", "nupes-w3", "calibration", "allocate"],
    "docs/recipes.md": ["", "nupes-w3", "calibration", "allocate"],
    **{f"docs/stages/{stage}.md": ["", "nupes-w3", "calibration", "allocate"]
       for stage in ("rtn", "nupes", "jlcm", "pv_tuning", "head", "allocate")},  # fmt: skip
    "docs/pruning.md": ["prune"],
    "docs/operations.md": ["scale", "offload"],
    "docs/runtime.md": ["decode"],
    "docs/FORMAT.md": [],
    "docs/reference.md": [],
    "docs/layout.md": [],
}
NOT_MEASURED = {"README.md": {"3.10"}}  # Python 3.10+
QUOTED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?%|(?<![\w.\-])\d+\.\d+(?![\w.])|(?<![\w.])\d+(?:\.\d+)?x\b")


def quoted_numbers(text: str) -> list[str]:
    """Decimal numbers, percentages and ratios of the prose: generated sections, code blocks and inline code
    left out."""
    text = re.sub(r"<!-- ([a-z-]+):start -->.*?<!-- \1:end -->", "", text, flags=re.DOTALL)
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return QUOTED.findall(text)


def supported(token: str, values: list[float]) -> bool:
    """`token` is one of `values` as printed: the same digits after rounding (a percentage from a fraction, MiB
    and GiB from bytes)."""
    digits = token.rstrip("%x")
    places = len(digits.split(".")[1]) if "." in digits else 0
    number = float(digits)
    scales = (100.0, 1.0) if token.endswith("%") else (1.0, 1 / 2**20, 1 / 2**30)
    return any(round(value * scale, places) == number for value in values for scale in scales)


def test_the_numbers_the_docs_quote_are_in_the_committed_results():
    import yaml

    from compress.recipe import json_schema

    settings = list(_numbers(json_schema()))
    settings += [n for path in (ROOT / "recipes").glob("*.yaml") for n in _numbers(yaml.safe_load(path.read_text()))]
    unsupported = {}
    for page, directories in PAGES.items():
        values = list(settings)
        for directory in directories:
            path = ROOT / "bench" / directory / "results.json"
            if path.is_file():
                values += list(_numbers(json.loads(path.read_text())))
        text = (ROOT / page).read_text()
        generated = re.findall(r"<!-- ([a-z-]+):start -->(.*?)<!-- \1:end -->", text, flags=re.DOTALL)
        values += [float(n) for _, body in generated for n in re.findall(r"\d+\.\d+|\d+", body)]  # the tables
        found = [t for t in quoted_numbers(text) if t not in NOT_MEASURED.get(page, set())]
        missing = [token for token in found if not supported(token, values)]
        if missing:
            unsupported[page] = missing
    assert not unsupported, f"numbers no committed results hold (rerun the script, or take them out): {unsupported}"


def test_the_check_finds_a_number_from_nowhere():
    assert quoted_numbers("perplexity 12.05, `bits: 3.5`, 46% better, 4.6x faster") == ["12.05", "46%", "4.6x"]
    assert supported("12.05", [12.0486]) and not supported("12.23", [12.0486])
    assert supported("46%", [0.4612]) and supported("3.4", [3.4 * 2**20])
