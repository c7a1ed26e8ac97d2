"""Text for calibration and evaluation, through `datasets`, cut into fixed-length token windows."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compress.errors import CompressError

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


IN_MEMORY = "in-memory"  # the source of text given to compress.run in Python (a recipe file cannot reload it)


def embedded_text() -> str:
    """Python's own `pydoc_data.topics`: English technical prose that ships with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def is_local_source(source: str) -> bool:
    """A source names a local file when it has a known text-file suffix or exists on disk."""
    path = Path(source)
    return source != "embedded" and (path.suffix in LOCAL_BUILDERS or path.exists())


def local_source_problem(source: str) -> str | None:
    """What is wrong with a local-file source (None when it is fine or is not a local file)."""
    if not is_local_source(source):
        return None
    path = Path(source)
    if not path.is_file():
        return "no such file"
    if path.suffix not in LOCAL_BUILDERS:
        return f"unknown file type {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)}"
    return None


def load_text(source: str, *, config: str | None = None, split: str = "train", text_field: str = "text") -> str:
    """All text of `source` joined with blank lines: `embedded`, a local .txt/.jsonl/.json/.parquet file, or a
    `datasets` hub name (with `config` and `split`)."""
    if source == "embedded":
        return embedded_text()
    if source == IN_MEMORY:
        raise CompressError(f"data source {IN_MEMORY!r} is text given to compress.run in Python; a recipe run "
                            "from a file needs the text's file or dataset name")  # fmt: skip
    import datasets

    problem = local_source_problem(source)
    if problem:
        raise CompressError(f"data source {source!r}: {problem}")
    path = Path(source)
    if is_local_source(source):
        loader = dict(path=LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        loader = dict(path=source, name=config, split=split)
    try:
        dataset = datasets.load_dataset(**loader)
    except Exception as error:  # datasets raises many unrelated types for a bad name, file or split
        raise CompressError(f"data source {source!r} could not be loaded through datasets: {error}") from error
    if text_field not in dataset.column_names:
        raise CompressError(
            f"data source {source!r} has no text field {text_field!r}; its fields are {dataset.column_names}"
        )
    separator = "\n" if loader["path"] == "text" else "\n\n"
    return separator.join(t for t in dataset[text_field] if isinstance(t, str))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens, as int64 `[n]`."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def select_half(ids: torch.Tensor, half: str) -> torch.Tensor:
    middle = len(ids) // 2
    return {"first": ids[:middle], "second": ids[middle:], "all": ids}[half]


def random_windows(ids: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """`count` windows `[count, seq_len]` starting at seeded random offsets (calibration)."""
    _require_tokens(ids, seq_len)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def proportional_counts(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`: each share rounded down, then the largest remainders (the
    earlier source on a tie) rounded up, so the counts sum to `total`."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(share) for share in shares]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - shares[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def consecutive_windows(ids: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """Up to `count` non-overlapping windows `[n, seq_len]` from the start of the text (evaluation)."""
    _require_tokens(ids, seq_len)
    available = len(ids) // seq_len
    if count > available:
        log.warning("only %d evaluation windows of %d tokens fit in the text (asked for %d)", available, seq_len, count)
    n = min(count, available)
    return ids[: n * seq_len].view(n, seq_len)


def _require_tokens(ids: torch.Tensor, seq_len: int) -> None:
    if len(ids) < seq_len:
        raise CompressError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
