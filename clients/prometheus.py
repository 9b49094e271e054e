"""A small parser of the Prometheus text exposition format (what GET /metrics returns).

    snap = parse_prometheus(text)
    snap["kvserve:num_requests_running"]          # [Sample(name, labels, value, timestamp)]
    snap.value("kvserve:request_success_total", finished_reason="length")   # summed
    snap.histogram("kvserve:e2e_request_latency_seconds").count
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,?)\s*')
_ESCAPE = re.compile(r"\\(.)")
# sample-name suffixes that belong to a family declared without them
_SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total", "_gsum", "_gcount", "_info")
_MISSING = object()


def _unescape(s: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str] = field(hash=False)
    value: float
    timestamp: int | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == str(v) for k, v in labels.items())


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets (upper bound `le`, count), sum and count of matching series."""
    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float


class MetricsSnapshot(Mapping[str, list[Sample]]):
    """Samples by sample name (a histogram's are under `<name>_bucket`, `_sum`, `_count`);
    `types` and `help` are by family name, as the `# TYPE` / `# HELP` lines give them."""

    def __init__(self, samples: dict[str, list[Sample]], types: dict[str, str],
                 help: dict[str, str]):
        self._samples, self.types, self.help = samples, types, help

    def __getitem__(self, name: str) -> list[Sample]:
        return self._samples[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def family(self, name: str) -> str:
        """The family a sample name belongs to (`x_bucket` -> `x` for a histogram `x`)."""
        if name in self.types:
            return name
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and name[:-len(suffix)] in self.types:
                return name[:-len(suffix)]
        return name

    def value(self, name: str, default: float | object = _MISSING, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`; `default` (or
        KeyError) when none match."""
        found = [s.value for s in self._samples.get(name, ()) if s.matches(labels)]
        if not found:
            if default is _MISSING:
                raise KeyError(f"no sample {name}{labels or ''}")
            return default  # type: ignore[return-value]
        return math.fsum(found)

    def histogram(self, name: str, **labels: str) -> Histogram:
        """Histogram `name` over the series whose labels include `labels` (summed)."""
        by_le: dict[float, float] = {}
        for s in self._samples.get(name + "_bucket", ()):
            if "le" in s.labels and s.matches(labels):
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
        if not by_le:
            raise KeyError(f"no histogram {name}{labels or ''}")
        return Histogram(tuple(sorted(by_le.items())), self.value(name + "_sum", 0.0, **labels),
                         self.value(name + "_count", 0.0, **labels))


def _parse_sample(line: str) -> Sample:
    m = _NAME.match(line)
    if m is None:
        raise ValueError(f"bad metric name in {line!r}")
    pos, labels = m.end(), {}
    if line.startswith("{", pos):
        pos += 1
        while True:
            while line.startswith(" ", pos):
                pos += 1
            if line.startswith("}", pos):
                pos += 1
                break
            lm = _LABEL.match(line, pos)
            if lm is None:
                raise ValueError(f"bad labels in {line!r}")
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
            if not lm.group(3) and not line.startswith("}", pos):
                raise ValueError(f"bad labels in {line!r}")
    rest = line[pos:].split()
    if not rest or len(rest) > 2 or (pos < len(line) and not line[pos].isspace()):
        raise ValueError(f"bad sample line {line!r}")
    value = float(rest[0])  # also NaN, +Inf, -Inf
    return Sample(m.group(), labels, value, int(rest[1]) if len(rest) == 2 else None)


def parse_prometheus(text: str) -> MetricsSnapshot:
    """Parse text exposition format 0.0.4. Raises ValueError on a malformed sample line."""
    samples: dict[str, list[Sample]] = {}
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].strip().split(None, 2)
            if len(parts) >= 2 and parts[0] == "TYPE":
                types[parts[1]] = parts[2].strip() if len(parts) > 2 else "untyped"
            elif len(parts) >= 2 and parts[0] == "HELP":
                helps[parts[1]] = _unescape(parts[2]) if len(parts) > 2 else ""
            continue
        sample = _parse_sample(line)
        samples.setdefault(sample.name, []).append(sample)
    return MetricsSnapshot(samples, types, helps)
