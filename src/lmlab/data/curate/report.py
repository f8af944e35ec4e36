"""The curation report: for every step, input = kept + removed (one reason per document,
the first rule that fired), plus counters of in-place edits that remove nothing."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepReport:
    name: str
    input: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    edits: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def keep(self) -> None:
        self.input += 1
        self.kept += 1

    def remove(self, rule: str) -> None:
        self.input += 1
        self.removed[rule] += 1

    def check(self) -> None:
        assert self.input == self.kept + sum(self.removed.values()), self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "input": self.input, "kept": self.kept,
                "removed": dict(sorted(self.removed.items())), "edits": dict(sorted(self.edits.items())),
                **self.extra}


@dataclass
class CurationReport:
    steps: list[StepReport] = field(default_factory=list)

    def step(self, name: str) -> StepReport:
        s = StepReport(name)
        self.steps.append(s)
        return s

    def to_dict(self) -> dict[str, Any]:
        steps = [s.to_dict() for s in self.steps]
        removed: Counter = Counter()
        for s in self.steps:
            removed.update({f"{s.name}.{k}": v for k, v in s.removed.items()})
        return {"input": self.steps[0].input if self.steps else 0,
                "kept": self.steps[-1].kept if self.steps else 0,
                "removed": dict(sorted(removed.items())), "steps": steps}
