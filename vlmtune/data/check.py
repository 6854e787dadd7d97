"""Validate data files before any training: the same checks for `vlmtune data check` and `vlmtune train`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.data.encode import EncodedSample, SampleDropped, SampleEncoder
from vlmtune.data.records import Problem, Sample, iter_samples


@dataclass
class DataReport:
    files: list[str]
    records: int = 0
    samples: list[Sample] = field(default_factory=list)  # passed every check
    encoded: list[EncodedSample] = field(default_factory=list)  # when checked against a model
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad(self) -> int:
        """Samples with at least one problem."""
        return self.records - len(self.samples)

    @property
    def truncated(self) -> int:
        return sum(1 for e in self.encoded if e.truncated)

    def summary(self) -> list[str]:
        with_images = sum(1 for s in self.samples if s.images)
        lines = [
            f"files: {', '.join(self.files)}",
            f"records: {self.records}; usable: {len(self.samples)}; bad: {self.bad}",
            f"samples with images: {with_images}; text-only: {len(self.samples) - with_images}; "
            f"images: {sum(len(s.images) for s in self.samples)}",
        ]
        if self.encoded:
            lengths = sorted(e.full_length for e in self.encoded)
            p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
            lines.append(
                f"tokens per sample (images included): min {lengths[0]}, median {int(statistics.median(lengths))}, "
                f"mean {statistics.fmean(lengths):.1f}, p95 {p95}, max {lengths[-1]}"
            )
            lines.append(f"longer than max_length (truncated, whole images kept): {self.truncated}")
        return lines


class _ImageChecker:
    """Opens each distinct image file once (header only) and remembers what was wrong with it."""

    def __init__(self):
        self._seen: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self._seen:
            self._seen[path] = self._check(path)
        return self._seen[path]

    @staticmethod
    def _check(path: Path) -> str | None:
        if not path.is_file():
            return f"image {path} does not exist"
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            return f"image {path} cannot be read: {err}"
        if width == 0 or height == 0:
            return f"image {path} is empty ({width}x{height})"
        return None


def check_data(files: list[str], images_root: str | None = None) -> DataReport:
    """Parse every record and open every image (header only); collect every problem. Needs no model."""
    report = DataReport(files=[str(f) for f in files])
    images = _ImageChecker()
    for path in files:
        for sample, found in iter_samples(path, images_root):
            report.records += 1
            if sample:
                found = [Problem(sample.where, sample.id, msg) for msg in filter(None, map(images.problem, sample.images))]
            if found:
                report.problems += found
            else:
                report.samples.append(sample)
    return report


def encode_checked(report: DataReport, encoder: SampleEncoder) -> DataReport:
    """Tokenize the report's good samples; those that cannot fit `max_length` become problems."""
    kept = []
    for sample in report.samples:
        try:
            report.encoded.append(encoder.encode(sample))
            kept.append(sample)
        except SampleDropped as err:
            report.problems.append(Problem(sample.where, sample.id, str(err)))
    report.samples = kept
    return report
