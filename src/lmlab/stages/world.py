"""Stage `world`: export a gold-reward world's files (corpus, chat SFT set, preference
pairs, eval prompts) -> world/. `world.flip_rate` makes the SortWorld labeller flip that
share of its preference labels (the label noise reward models are tested under)."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError

NEEDS: tuple[str, ...] = ()
SECTIONS = ("world",)


@dataclass(frozen=True)
class WorldConfig:
    name: str = "sort"
    seed: int = 0
    n: int = 1000  # SFT conversations exported (SortWorld); keys (FactWorld)
    flip_rate: float = 0.0  # SortWorld: share of preference labels flipped by the labeller

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_rate <= 0.5:
            raise LmlabError(f"world.flip_rate must be in [0, 0.5] (a share of flipped labels), got {self.flip_rate}")
        if self.flip_rate and self.name != "sort":
            raise LmlabError(f"world.flip_rate applies to SortWorld's preference labels; world {self.name!r} "
                             "exports none: drop flip_rate or use name: sort")


CONFIG = ("world", WorldConfig)


def run(ctx) -> None:
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig

    w = ctx.recipe.world
    manifest = export_world(w.name, ctx.out, seed=w.seed, n=w.n, labeller=LabellerConfig(flip_rate=w.flip_rate))
    ctx.echo(f"world {w.name}: " + ", ".join(f"{f} {n}" for f, n in manifest["files"].items()))
