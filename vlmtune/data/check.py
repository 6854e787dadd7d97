"""Validate data files before any training: the same checks for `vlmtune data check` and `vlmtune train`."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data.encode import EncodedSample, SampleDropped, SampleEncoder
from vlmtune.data.images import DEFAULT_MAX_PIXELS, ImageChecker
from vlmtune.data.records import Problem, Sample, iter_samples

SKIPPED_FILE = "skipped_samples.jsonl"  # beside a run's output: every sample `data.skip_bad` left out


@dataclass
class DataReport:
    files: list[str]
    records: int = 0
    samples: list[Sample] = field(default_factory=list)  # passed every check
    encoded: list[EncodedSample] = field(default_factory=list)  # when checked against a model
    problems: list[Problem] = field(default_factory=list)
    downscaled: list[Problem] = field(default_factory=list)  # usable samples with images over the pixel limit

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
        if self.downscaled:
            lines.append(f"samples with images over data.max_image_pixels, downscaled as they load: {len(self.downscaled)}")
            lines += [f"  - {note}" for note in self.downscaled[:10]]
        if self.encoded:
            lengths = sorted(e.full_length for e in self.encoded)
            p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
            lines.append(
                f"tokens per sample (images included): min {lengths[0]}, median {int(statistics.median(lengths))}, "
                f"mean {statistics.fmean(lengths):.1f}, p95 {p95}, max {lengths[-1]}"
            )
            lines.append(f"longer than max_length (truncated, whole images kept): {self.truncated}")
        return lines


def check_data(files: list[str], images_root: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               downscale: bool = False) -> DataReport:
    """Parse every record and decode every image (at reduced size where the format allows); collect every
    problem. Needs no model."""
    report = DataReport(files=[str(f) for f in files])
    images = ImageChecker(max_pixels, downscale)
    for path in files:
        if not Path(path).is_file():  # a missing file is not a bad sample: nothing in it was read
            report.problems.append(Problem(str(path), None, "data file does not exist"))
            continue
        before = report.records
        for sample, found in iter_samples(path, images_root):
            report.records += 1
            if sample:
                found = [Problem(sample.where, sample.id, msg) for msg in filter(None, map(images.problem, sample.images))]
            if found:
                report.problems += found
            else:
                report.samples.append(sample)
                report.downscaled += [Problem(sample.where, sample.id, note)
                                      for note in filter(None, map(images.note, sample.images))]
        if report.records == before:
            report.problems.append(Problem(str(path), None, "the file holds no records"))
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


def write_problems(path: Path, problems: dict[str, list[Problem]]) -> Path:
    """One JSON line per problem (`split`, `where`, `id`, `problem`): the full list, where the console shows 10."""
    with open(path, "w") as fh:
        for split, found in problems.items():
            for p in found:
                fh.write(json.dumps({"split": split, "where": p.where, "id": p.sample_id, "problem": p.message}) + "\n")
    return path
