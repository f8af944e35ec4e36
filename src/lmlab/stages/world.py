"""Stage `world`: export a gold-reward world's files (corpus, chat SFT set, preference
pairs, eval prompts) -> world/."""
from __future__ import annotations

from dataclasses import dataclass

NEEDS: tuple[str, ...] = ()
SECTIONS = ("world",)


@dataclass(frozen=True)
class WorldConfig:
    name: str = "sort"
    seed: int = 0
    n: int = 1000  # SFT conversations exported (SortWorld); keys (FactWorld)


CONFIG = ("world", WorldConfig)


def run(ctx) -> None:
    from lmlab.worlds.export import export_world

    w = ctx.recipe.world
    manifest = export_world(w.name, ctx.out, seed=w.seed, n=w.n)
    ctx.echo(f"world {w.name}: " + ", ".join(f"{f} {n}" for f, n in manifest["files"].items()))
