import json

import pytest
import torch

from compress.data import consecutive_windows, embedded_text, load_text, random_windows, select_half
from compress.errors import CompressError


def test_embedded_text_is_large_english_prose():
    text = embedded_text()
    assert len(text) > 400_000 and "the" in text


def test_local_files_through_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    assert load_text(str(tmp_path / "a.txt")) == "first line\nsecond line"
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl"), text_field="body") == "one\n\ntwo"
    with pytest.raises(CompressError, match="no text field 'text'.*body"):
        load_text(str(tmp_path / "b.jsonl"))
    with pytest.raises(CompressError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))


def test_parquet_file(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert load_text(str(tmp_path / "c.parquet")) == "alpha\n\nbeta"


def test_windows_are_seeded_and_fixed():
    ids = torch.arange(1000)
    a, b = random_windows(ids, 4, 16, seed=1), random_windows(ids, 4, 16, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, random_windows(ids, 4, 16, seed=2))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 16)) for w in a)
    windows = consecutive_windows(ids, 100, 300)
    assert windows.shape == (3, 300) and torch.equal(windows.flatten(), ids[:900])
    assert torch.equal(select_half(ids, "second"), ids[500:])
    with pytest.raises(CompressError, match="fewer than one window"):
        consecutive_windows(ids[:10], 1, 16)
