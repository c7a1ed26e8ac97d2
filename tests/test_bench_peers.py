"""scripts/bench.py's peer rows: the command each peer's script gets (its settings passed as options), and that an
earlier peer compression is reused only when made with the same settings."""

import json
from pathlib import Path

from tests.test_docs import script


def _method(bench, name):
    return next(m for m in bench.METHODS if m.name == name)


def test_an_autoscheme_row_passes_its_average_and_steps(tmp_path, monkeypatch):
    bench = script("bench")
    seen = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **_: seen.append(command))
    monkeypatch.setattr(bench, "read_peer_figures", lambda out, row: None)
    method = _method(bench, "autoscheme-2.5")
    row = bench.Row(method.name, 2, 64)
    bench.compress_peer(method, Path("base"), tmp_path / "out", 2, 64, Path("windows.safetensors"), row, 60)
    (command,) = seen
    assert command[1].endswith("autoround_quantize.py")
    options = dict(zip(command[2::2], command[3::2], strict=True))
    assert options == {"--model": "base", "--out": str(tmp_path / "out"), "--bits": "2", "--group-size": "64",
                       "--calibration": "windows.safetensors", "--avg-bits": "2.5", "--iters": "50"}  # fmt: skip


def test_a_peer_compression_is_reused_only_with_the_same_settings(tmp_path):
    bench = script("bench")
    method = _method(bench, "autoscheme-2.5")
    peer = {"calibration_samples": 128, "avg_bits": 2.5, "iters": 50, "seconds": 1.0, "peak_rss_bytes": 1,
            "bits_per_weight": 2.5, "checkpoint_bytes": 10, "layers_by_bits": {"2": 3, "3": 1}}  # fmt: skip
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    row = bench.Row(method.name, 2, 64)
    assert bench.reuse(method, Path("base"), tmp_path, row, 128)
    assert row.bits_per_weight == 2.5 and "AutoScheme chose 3 layers at 2 bits, 1 layers at 3 bits" in row.notes
    assert not bench.reuse(method, Path("base"), tmp_path, bench.Row(method.name, 2, 64), 64)
    (tmp_path / "peer.json").write_text(json.dumps(peer | {"iters": 0}))
    assert not bench.reuse(method, Path("base"), tmp_path, bench.Row(method.name, 2, 64), 128)
