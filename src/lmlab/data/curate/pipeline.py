"""The whole curation pipeline: clean -> heuristic quality -> exact/near dedup -> learned
filter. Cheap per-document rules run first so that dedup only sees survivors. Intermediate
results are spilled to JSONL in a temporary directory, so memory stays bounded by the dedup
arrays, not by the corpus."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lmlab.config import from_mapping
from lmlab.io import check_output_file
from lmlab.data.curate.classifier import QualityClassifier
from lmlab.data.curate.clean import CleanConfig, clean_documents
from lmlab.data.curate.learned import LearnedFilterConfig, filter_learned
from lmlab.data.curate.dedup import DedupConfig, dedup_documents
from lmlab.data.curate.documents import Source, read_documents, write_documents
from lmlab.data.curate.quality import QualityConfig, filter_quality
from lmlab.data.curate.report import CurationReport


@dataclass(frozen=True)
class CurateConfig:
    clean: CleanConfig | None = field(default_factory=CleanConfig)       # null skips a step
    quality: QualityConfig | None = field(default_factory=QualityConfig)
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    learned: LearnedFilterConfig | None = None


def curate_config(data: Mapping[str, Any] | None) -> CurateConfig:
    """Strict YAML/dict loading; a section given as null is switched off."""
    data = dict(data or {})
    defaults = CurateConfig()
    for key in ("clean", "quality", "dedup"):
        if key in data and data[key] == {}:
            data[key] = getattr(defaults, key)
    return from_mapping(CurateConfig, data, where="curate")


def curate(source: Source, out_path: str | Path, cfg: CurateConfig = CurateConfig(),
           workdir: str | Path | None = None, overwrite: bool = False) -> CurationReport:
    """Run every enabled step over `source` (read once or twice) and write the survivors to
    `out_path` (JSONL, atomically). Returns the report; its counts add up step by step.
    An existing non-empty `out_path` is refused before any work, unless `overwrite`."""
    check_output_file(out_path, overwrite=overwrite)
    report = CurationReport()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="lmlab-curate-") as tmp:
        docs = clean_documents(source, cfg.clean, report.step("clean")) if cfg.clean else _iter(source)
        if cfg.quality:
            docs = filter_quality(docs, cfg.quality, report.step("quality"))
        stage = Path(tmp) / "stage1.jsonl"
        write_documents(stage, docs, overwrite=True)
        if cfg.dedup:
            dedup_step = report.step("dedup")
            deduped = dedup_documents(lambda: read_documents(stage), cfg.dedup, dedup_step, workdir=tmp)
            if cfg.learned and cfg.learned.model:
                stage2 = Path(tmp) / "stage2.jsonl"
                write_documents(stage2, deduped, overwrite=True)
                stage = stage2
            else:
                write_documents(out_path, deduped, overwrite=overwrite)
                return _checked(report)
        if cfg.learned and cfg.learned.model:
            clf = QualityClassifier.load(cfg.learned.model)
            write_documents(out_path, filter_learned(lambda: read_documents(stage), clf, cfg.learned, report.step("learned")),
                            overwrite=overwrite)
        else:
            write_documents(out_path, read_documents(stage), overwrite=overwrite)
    return _checked(report)


def _iter(source: Source):
    from lmlab.data.curate.documents import iterate

    return iterate(source)


def _checked(report: CurationReport) -> CurationReport:
    for s in report.steps:
        s.check()
    return report
