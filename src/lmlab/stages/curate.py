"""Stage `curate`: clean, filter and deduplicate the recipe's corpus (the embedded one by
default) with `lmlab.data.curate.curate` -> curate/curated.jsonl (the kept documents) and
curate/curation_report.json (per step: input = kept + removed, by rule). With this stage
in the recipe, the tokenizer and shards stages read curated.jsonl instead of the corpus.
The recipe's `curate:` section is a `CurateConfig` (docs/curation.md); a step set to null
is switched off."""
from __future__ import annotations

from lmlab.data.curate import CurateConfig

NEEDS: tuple[str, ...] = ()
SECTIONS = ("curate", "data")
CONFIG = ("curate", CurateConfig)
REPORT = "curation_report.json"


def documents(data) -> list[dict] | str:
    """The recipe's corpus as curation documents: the embedded files (id = their path under
    the corpus), or the path itself (JSONL keeps its fields; other formats give bare texts)."""
    if data.source == "embedded":
        from lmlab.data.corpus import embedded_corpus_dir, embedded_corpus_files

        root = embedded_corpus_dir()
        return [{"id": str(p.relative_to(root)), "text": p.read_text(encoding="utf-8")}
                for p in embedded_corpus_files()]
    return data.source


def run(ctx) -> None:
    import time

    from lmlab.data.curate import curate, read_documents
    from lmlab.io import write_json_atomic
    from lmlab.stages.common import CURATED

    data = ctx.recipe.data
    docs = documents(data)
    source = docs if isinstance(docs, list) else (lambda: read_documents(docs, data.text_field))
    t0 = time.perf_counter()
    ctx.out.mkdir(parents=True, exist_ok=True)
    # A rerun replaces the stage's whole directory first, so an existing file here is a
    # half-written one of this stage: overwrite it.
    report = curate(source, ctx.out / CURATED, ctx.recipe.curate, workdir=ctx.out, overwrite=True).to_dict()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["source"] = data.source
    write_json_atomic(ctx.out / REPORT, report)
    removed = report["input"] - report["kept"]
    ctx.echo(f"curate: kept {report['kept']} of {report['input']} documents ({removed} removed: "
             + (", ".join(f"{k} {v}" for k, v in report["removed"].items()) or "none")
             + f") in {report['seconds']:.1f} s -> {ctx.out / CURATED}")
