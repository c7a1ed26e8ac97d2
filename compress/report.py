"""The run's record: JSON for machines, Markdown and a terminal table for people."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Any

WORST_SHOWN = 5  # layers listed by name in the summary of layers
BLOCK_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # `<blocks>.<index>.<layer>`, e.g. model.layers.3.mlp.up_proj


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
    overrides: dict[str, Any] = field(default_factory=dict)  # `--set` fields (the resolved recipe is recipe.yaml)
    samples: dict[str, Any] = field(default_factory=dict)  # a short greedy generation: prompt, original, compressed
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: list[dict[str, Any]] = field(default_factory=list)  # where the calibration windows came from
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

    def headline(self) -> str:
        """What a person reads first: size, quality and speed against the original, in two sentences."""
        parts = []
        bits, after, before = self.after.get("bits_per_weight"), self.size.get("checkpoint_bytes"), \
            self.size.get("original_bytes")  # fmt: skip
        if bits:
            parts.append(f"{bits:.2f} bits per weight in the compressed layers")
        if after and before:
            parts.append(f"{_mb(after)} of weights against {_mb(before)} as float16 ({before / after:.2f}x smaller)")
        sentence = "; ".join(parts)
        quality = []
        if "perplexity" in self.before and "perplexity" in self.after:
            change = self.after["perplexity"] / self.before["perplexity"] - 1
            quality.append(f"perplexity {self.before['perplexity']:.2f} -> {self.after['perplexity']:.2f} "
                           f"({change:+.1%})")  # fmt: skip
        if self.after.get("kl_to_original") is not None:
            kl = self.after["kl_to_original"]
            quality.append(f"KL to the original {kl:.3f} nats/token ({_closeness(kl)})")
        if "embedding_cosine" in self.after:
            quality.append(f"embedding cosine to the original {self.after['embedding_cosine']:.4f}")
        before_speed, after_speed = self.before.get("decode_tokens_per_second"), \
            self.after.get("decode_tokens_per_second")  # fmt: skip
        if before_speed and after_speed:
            quality.append(f"batch-1 decode {after_speed / before_speed:.2f}x the original's tokens/s")
        text = sentence + ". " if sentence else ""
        if quality:
            text += quality[0][0].upper() + "; ".join(quality)[1:] + "."
        seconds = self.total.get("seconds")
        if seconds is not None:
            took = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
            text += f" The run took {took}, peak memory {_mb(self.total.get('peak_rss_bytes'))}."
        return text

    def recipe_line(self) -> str:
        overrides = " ".join(f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}"
                             for k, v in self.overrides.items())  # fmt: skip
        return f"`{self.recipe}`" + (f" with `{overrides}`" if overrides else "") + " (resolved in `recipe.yaml`)"

    def to_text(self) -> str:
        rows = [("", "before", "after"), *self.summary_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [self.headline(), ""]
        lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        if self.samples:
            lines += ["", f"prompt: {self.samples['prompt']!r}",
                      f"  original:   {self.samples['original']!r}", f"  compressed: {self.samples['compressed']!r}"]
        worst = self.worst_layers()
        if worst:
            lines += ["", "largest relative weight errors: " + ", ".join(f"{n} {e:.3g}" for n, e in worst)]
        return "\n".join(lines)

    def worst_layers(self) -> list[tuple[str, float]]:
        errors = [(n, layer["relative_error"]) for n, layer in self.layers.items()
                  if isinstance(layer.get("relative_error"), (int, float))]  # fmt: skip
        return sorted(errors, key=lambda item: -item[1])[:WORST_SHOWN]

    def layer_kinds(self) -> dict[str, dict[str, Any]]:
        """Per kind of layer (`self_attn.q_proj`, ...): count, bits per weight, mean and largest error by block."""
        kinds: dict[str, dict[str, Any]] = {}
        for name, layer in self.layers.items():
            match = BLOCK_LAYER.match(name)
            kind, block = (match.group(3), int(match.group(2))) if match else (name, None)
            entry = kinds.setdefault(kind, {"layers": 0, "weights_bits": [], "errors": []})
            entry["layers"] += 1
            entry["weights_bits"].append(layer["bits_per_weight"])
            if isinstance(layer.get("relative_error"), (int, float)):
                entry["errors"].append((block, layer["relative_error"]))
        return kinds

    def error_chart(self) -> str | None:
        """SVG: each kind of layer's relative weight error by block (None without per-layer errors)."""
        from compress.plot import line_chart_svg

        series = {kind: [(block, error) for block, error in entry["errors"] if block is not None]
                  for kind, entry in self.layer_kinds().items()}  # fmt: skip
        series = {kind: points for kind, points in series.items() if points}
        if not series:
            return None
        return line_chart_svg(series, "Relative weight error by block", "block", "relative weight error")

    def allocation_lines(self) -> list[str]:
        """What `allocate` chose: layers and bits per candidate, the budget against what was used, and the
        predicted loss increase (the Fisher estimate) against the measured KL."""
        chosen = {name: layer["allocation"] for name, layer in self.layers.items() if "allocation" in layer}
        stage = next((s for s in self.stages if s.name == "allocate"), None)
        if not chosen or stage is None:
            return []
        summary = stage.metrics.get("summary", {})
        lines = ["![bits per weight of each layer by block](allocation.svg)", "",
                 "| candidate | layers | bits/weight | predicted KL |", "|---|---:|---:|---:|"]  # fmt: skip
        for candidate in dict.fromkeys(entry["candidate"] for entry in chosen.values()):
            names = [n for n, e in chosen.items() if e["candidate"] == candidate]
            bits = sum(self.layers[n]["bits_per_weight"] for n in names) / len(names)
            predicted = sum(chosen[n]["predicted_kl"] for n in names)
            lines.append(f"| {candidate} | {len(names)} | {bits:.3f} | {_fmt(predicted)} |")
        used = summary.get("chosen_bytes", summary.get("chosen_bits"))
        allowed = summary.get("allowed_bytes", summary.get("allowed_bits"))
        unit = "bytes" if "chosen_bytes" in summary else "bits"
        lines += ["", f"Budget: {summary.get('budget')} ({summary.get('budget_unit')}); chosen {used} of {allowed} "
                  f"{unit} as planned, measured {self.size.get('checkpoint_bytes')} bytes of weight files. "
                  f"Predicted KL {_fmt(summary.get('predicted_kl'))} (the sum of each layer's Fisher estimate), "
                  f"measured {_fmt(self.after.get('kl_to_original'))}."]  # fmt: skip
        if "head" in summary:
            lines[-1] += f" Output head: {summary['head']}."
        return lines

    def allocation_chart(self) -> str | None:
        """SVG: each kind of layer's stored bits per weight by block, as `allocate` chose them."""
        from compress.plot import line_chart_svg

        series: dict[str, list[tuple[float, float]]] = {}
        for name, layer in self.layers.items():
            match = BLOCK_LAYER.match(name)
            if "allocation" in layer and match:
                series.setdefault(match.group(3), []).append((int(match.group(2)), layer["bits_per_weight"]))
        if not series:
            return None
        return line_chart_svg(series, "Bits per weight by block (allocate)", "block", "bits per weight")

    def calibration_line(self) -> str:
        """Where the calibration windows came from, e.g. `96 windows of 512 tokens sampled from the original
        model (temperature 1, top-p 0.95, from random tokens; reused from the cache), 32 from embedded (first
        half)`."""
        parts = []
        for entry in self.calibration:
            if entry.get("source") == "generated":
                how = (f"temperature {entry['temperature']:g}, top-p {entry['top_p']:g}, from "
                       f"{'random tokens' if entry['first_token'] == 'random' else 'the beginning-of-text token'}; "
                       + ("reused from the cache" if entry.get("cached") else f"{entry['seconds']:.0f} s"))  # fmt: skip
                parts.append(f"{entry['windows']} sampled from the original model ({how})")
            else:
                half = "the whole text" if entry["half"] == "all" else f"{entry['half']} half"
                parts.append(f"{entry['windows']} from {_cell(str(entry['source']))} ({half})")
        seq_len = next((e["seq_len"] for e in self.calibration if "seq_len" in e), None)
        head = f"windows of {seq_len} tokens: " if seq_len else ""
        return head + ", ".join(parts)

    def to_markdown(self) -> str:
        lines = [f"# Compression report: {self.model.get('source', '')}", "", self.headline(), ""]
        lines += [f"Recipe: {self.recipe_line()}", ""]
        if self.calibration:
            lines += [f"Calibration: {self.calibration_line()}", ""]
        lines += ["| measure | before | after |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.summary_rows()]
        if self.samples:
            lines += ["", "## A greedy sample", "", f"Prompt: {_cell(self.samples['prompt'])}", "",
                      "| original | compressed |", "|---|---|",
                      f"| {_cell(self.samples['original'])} | {_cell(self.samples['compressed'])} |"]  # fmt: skip
        lines += ["", "## Stages", "", "| stage | seconds | peak RSS | figures |", "|---|---:|---:|---|"]
        lines += [f"| {s.name} | {s.seconds:.1f} | {_mb(s.peak_rss_bytes)} | {_figures(s.metrics)} |"
                  for s in self.stages]  # fmt: skip
        allocation = self.allocation_lines()
        if allocation:
            lines += ["", "## Allocation", "", *allocation]
        if self.layers:
            lines += ["", "## Layers", ""]
            kinds = self.layer_kinds()
            if any(block is not None for entry in kinds.values() for block, _ in entry["errors"]):  # the chart
                lines += ["![relative weight error by block](report.svg)", ""]
            lines += ["| kind | layers | bits/weight | mean relative error | largest (block) |",
                      "|---|---:|---:|---:|---:|"]  # fmt: skip
            for kind, entry in kinds.items():
                bits = sum(entry["weights_bits"]) / len(entry["weights_bits"])
                errors = entry["errors"]
                mean = _fmt(sum(e for _, e in errors) / len(errors)) if errors else "-"
                block, largest = max(errors, key=lambda item: item[1]) if errors else (None, None)
                where = "" if block is None else f" ({block})"
                lines.append(f"| {kind} | {entry['layers']} | {bits:.3f} | {mean} | {_fmt(largest)}{where} |")
            worst = self.worst_layers()
            if worst:
                lines += ["", "Largest relative weight errors: " + ", ".join(f"`{n}` {e:.3g}" for n, e in worst)]
            lines += ["", f"<details><summary>All {len(self.layers)} layers</summary>", "",
                      "| layer | format | settings | bits/weight | relative weight error |", "|---|---|---|---:|---:|"]
            for name, layer in self.layers.items():
                settings = ", ".join(f"{k}={v}" for k, v in layer.get("settings", {}).items())
                lines.append(f"| {name} | {layer['format']} | {settings} | {layer['bits_per_weight']:.3f} | "
                             f"{_fmt(layer.get('relative_error'))} |")  # fmt: skip
            lines += ["", "</details>"]
        return "\n".join(lines) + "\n"


def _figures(metrics: dict[str, Any]) -> str:
    """A stage's headline figures (its `summary`), e.g. the share of codes learning changed and the block output
    error before and after it on held-out calibration batches."""
    summary = metrics.get("summary")
    if not isinstance(summary, dict):
        return ""
    return ", ".join(f"{key.replace('_', ' ')} {_fmt(value)}" for key, value in summary.items())


def _closeness(kl: float) -> str:
    """A reading of the KL per token (a rule of thumb, said as one in the docs)."""
    if kl < 0.05:
        return "very close to the original"
    if kl < 0.15:
        return "close to the original"
    if kl < 0.5:
        return "a noticeable change"
    return "a large change"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(nothing)"


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
