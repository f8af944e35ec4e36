"""Stage `export`: the run's final policy as a Hugging Face directory
(`lmlab.interop.hf.convert_to_hf`, loadable by transformers' AutoModelForCausalLM) and one
GGUF file llama.cpp runs (`lmlab.interop.gguf.export_gguf`) -> export/hf/, export/model.gguf
and export/export_report.json (the source, parameter count and file sizes).

`export.source: auto` takes the last policy stage of the recipe's stages (sft, rejection,
ppo, grpo, rloo, dpo, in the order the recipe runs them); or name the stage."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError
from lmlab.stages.common import POLICY_STAGES

NEEDS: tuple[str, ...] = ()
USES = POLICY_STAGES  # the recipe's stages among these are hashed as inputs
SECTIONS = ("export",)
REPORT = "export_report.json"


@dataclass(frozen=True)
class ExportConfig:
    source: str = "auto"  # auto | sft | rejection | ppo | dpo | any stage of the run that writes model/
    hf: bool = True
    gguf: bool = True
    gguf_type: str = "q8_0"  # f32 | f16 | q8_0 (matrices; norms stay f32)

    def __post_init__(self) -> None:
        from lmlab.interop.gguf import TYPES

        if self.gguf_type not in TYPES:
            raise LmlabError(f"export.gguf_type must be one of {', '.join(TYPES)}, got {self.gguf_type!r}")
        if not (self.hf or self.gguf):
            raise LmlabError("export.hf and export.gguf are both false: nothing to export; enable one")


CONFIG = ("export", ExportConfig)


def source_stage(cfg: ExportConfig, stages) -> str:
    """The stage whose model/ is exported."""
    if cfg.source != "auto":
        if cfg.source not in stages:
            raise LmlabError(f"export.source={cfg.source!r} is not one of this recipe's stages "
                             f"({', '.join(stages)}); name one of them, or use auto")
        return cfg.source
    policies = [s for s in stages if s in POLICY_STAGES]
    if not policies:
        raise LmlabError(f"export.source=auto finds no policy stage ({', '.join(POLICY_STAGES)}) in this recipe's "
                         "stages; add one (e.g. sft) or set export.source to a stage that writes model/")
    return policies[-1]


def _size(path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(ctx) -> None:
    from lmlab.checkpoint import checkpoint_kind
    from lmlab.io import write_json_atomic
    from lmlab.stages.common import model_dir

    cfg = ctx.recipe.export
    stage = source_stage(cfg, ctx.recipe.stages)
    src = model_dir(ctx.run_dir, stage)
    kind = checkpoint_kind(src)
    if kind != "lm":
        raise LmlabError(f"{src} is a {kind!r} checkpoint, not a language model; export.source must name a "
                         "policy stage")
    report = {"source": stage, "model": str(src), "files": {}}
    ctx.out.mkdir(parents=True, exist_ok=True)
    # A rerun replaces this stage's directory first: an existing output is a half-done one of ours.
    if cfg.hf:
        from lmlab.interop.hf import convert_to_hf

        hf = convert_to_hf(src, ctx.out / "hf", overwrite=True)
        report["files"]["hf"] = {"path": "hf", "bytes": _size(hf)}
        ctx.echo(f"export: Hugging Face directory -> {hf} ({_size(hf):,} bytes)")
    if cfg.gguf:
        from lmlab.interop.gguf import export_gguf

        gguf = export_gguf(src, ctx.out / "model.gguf", type=cfg.gguf_type)
        report["files"]["gguf"] = {"path": "model.gguf", "type": cfg.gguf_type, "bytes": _size(gguf)}
        ctx.echo(f"export: GGUF ({cfg.gguf_type}) -> {gguf} ({_size(gguf):,} bytes)")
    report["model_bytes"] = _size(src / "model.safetensors") if (src / "model.safetensors").is_file() else None
    write_json_atomic(ctx.out / REPORT, report)
