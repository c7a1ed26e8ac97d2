"""The run's record: JSON for machines, Markdown and a terminal table for people."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    model: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    total: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # every other file: bytes and sha256

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(measure, before, after) rows of the headline table."""
        rows = []
        for key, label in (("perplexity", "perplexity"), ("embedding_cosine", "embedding cosine to original")):
            if key in self.before or key in self.after:
                rows.append((label, _fmt(self.before.get(key)), _fmt(self.after.get(key))))
        if "kl_to_original" in self.after:
            rows.append(("KL to original (nats/token)", "0", _fmt(self.after["kl_to_original"])))
        if self.after.get("parameters", self.model.get("parameters")) != self.model.get("parameters"):
            rows.append(("parameters", _fmt(self.model.get("parameters")), _fmt(self.after.get("parameters"))))
        rows.append(("bits per weight (quantized layers)", "16", _fmt(self.after.get("bits_per_weight"))))
        rows.append(("size (weight files; original as float16)", _mb(self.size.get("original_bytes")),
                     _mb(self.size.get("checkpoint_bytes"))))  # fmt: skip
        for key, label in (("decode_tokens_per_second", "decode tokens/s (batch 1)"),
                           ("prefill_tokens_per_second", "prefill tokens/s (batch 1)"),
                           ("tokens_per_second", "forward tokens/s")):  # fmt: skip
            if key in self.before or key in self.after:
                rows.append((label, _fmt(self.before.get(key)), _fmt(self.after.get(key))))
        rows.append(("wall time", "", f"{self.total.get('seconds', 0):.1f} s"))
        rows.append(("peak memory (RSS)", "", _mb(self.total.get("peak_rss_bytes"))))
        return rows

    def to_text(self) -> str:
        rows = [("", "before", "after"), *self.summary_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)

    def to_markdown(self) -> str:
        lines = [f"# Compression report: {self.model.get('source', '')}", "", f"Recipe: `{self.recipe}`", ""]
        lines += ["| measure | before | after |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.summary_rows()]
        lines += ["", "## Stages", "", "| stage | seconds | peak RSS |", "|---|---:|---:|"]
        lines += [f"| {s.name} | {s.seconds:.1f} | {_mb(s.peak_rss_bytes)} |" for s in self.stages]
        lines += ["", "## Layers", "", "| layer | format | settings | bits/weight | relative weight error |"]
        lines += ["|---|---|---|---:|---:|"]
        for name, layer in self.layers.items():
            settings = ", ".join(f"{k}={v}" for k, v in layer.get("settings", {}).items())
            lines.append(
                f"| {name} | {layer['format']} | {settings} | {layer['bits_per_weight']:.3f} | "
                f"{_fmt(layer.get('relative_error'))} |"
            )
        return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from compress import __version__

    return {
        "compress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"
