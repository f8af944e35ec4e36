"""FactWorld: a table of made-up facts (key -> value) for knowledge vs. instruction following.

Keys are invented two-syllable names ("bako", "dimu"), values are common colour words: short,
lowercase and space-separated, so any tokenizer sees a handful of tokens per fact and no fact
leaks from real-world knowledge. The world has three parts:
- a pretraining corpus that states every fact (at least once, usually several times) and
  asks questions that it answers only sometimes (with probability `p_answer`; otherwise it
  rambles on), so a base model knows the facts but does not reliably answer;
- an instruction (SFT) set answering the question for a subset of keys (`sft_keys`);
- an evaluation set of the same question for the held-out keys, scored by exact match.
A model that learns from SFT to *answer* (not to memorise the SFT keys) reaches the held-out
facts through its pretraining: the setting in which a small tuned model can steer a larger
base (proxy-tuning).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from lmlab.errors import LmlabError

VALUES = ("red", "blue", "green", "black", "white", "brown", "pink", "gray", "gold", "orange", "purple", "yellow")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class FactConfig:
    n_keys: int = 200
    sft_fraction: float = 0.5
    mentions: int = 6  # mentions of each key in the pretraining corpus
    per_doc: int = 8  # mentions per document
    p_statement: float = 0.5  # a mention states the fact, else asks the question
    p_answer: float = 0.3  # a question in the corpus is answered with this probability

    def __post_init__(self) -> None:
        max_keys = (len(_CONSONANTS) * len(_VOWELS)) ** 2
        if not 2 <= self.n_keys <= max_keys:
            raise LmlabError(f"fact.n_keys must be in 2..{max_keys}, got {self.n_keys}")
        if not 0.0 < self.sft_fraction < 1.0:
            raise LmlabError(f"fact.sft_fraction must be strictly between 0 and 1, got {self.sft_fraction}")
        for name in ("p_statement", "p_answer"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LmlabError(f"fact.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.mentions < 1 or self.per_doc < 1:
            raise LmlabError("fact.mentions and fact.per_doc must be at least 1")


def question(key: str) -> str:
    return f"what is the color of {key}?"


def base_prompt(key: str) -> str:
    """The question as the pretraining corpus writes it, for models without a chat template."""
    return f"question: {question(key)}\nanswer:"


def statement(key: str, value: str) -> str:
    return f"the color of {key} is {value}."


@dataclass(frozen=True)
class FactWorld:
    facts: dict[str, str]
    sft_keys: tuple[str, ...]
    heldout_keys: tuple[str, ...]

    def sft_examples(self) -> list[tuple[str, str]]:
        return [(question(k), self.facts[k]) for k in self.sft_keys]

    def eval_examples(self) -> list[tuple[str, str]]:
        return [(question(k), self.facts[k]) for k in self.heldout_keys]

    def eval_base_prompts(self) -> list[str]:
        return [base_prompt(k) for k in self.heldout_keys]


def make_world(seed: int, cfg: FactConfig = FactConfig()) -> FactWorld:
    rng = random.Random(f"fact-world:{seed}")
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    names = rng.sample([a + b for a in syllables for b in syllables], cfg.n_keys)
    facts = {k: rng.choice(VALUES) for k in names}
    n_sft = min(cfg.n_keys - 1, max(1, round(cfg.sft_fraction * cfg.n_keys)))
    return FactWorld(facts, tuple(names[:n_sft]), tuple(names[n_sft:]))


def _ramble(rng: random.Random, world: FactWorld) -> str:
    other = rng.choice(list(world.facts))
    return rng.choice((
        f"hard to say. people often ask about {other} instead.",
        "nobody in the village could remember.",
        f"that reminds me of {other}, which is a long story.",
        "i will come back to that question later.",
    ))


def corpus_documents(world: FactWorld, seed: int, cfg: FactConfig = FactConfig()) -> list[str]:
    """The rambling base model's pretraining text. One mention of each key states its fact;
    the other `mentions - 1` state it or ask the question, answered with probability
    `p_answer`. Mentions are shuffled across documents."""
    rng = random.Random(f"fact-corpus:{seed}")
    mentions = []
    for key, value in world.facts.items():
        mentions.append(statement(key, value))
        for _ in range(cfg.mentions - 1):
            if rng.random() < cfg.p_statement:
                mentions.append(statement(key, value))
            elif rng.random() < cfg.p_answer:
                mentions.append(f"{base_prompt(key)} {value}")
            else:
                mentions.append(f"{base_prompt(key)} {_ramble(rng, world)}")
    rng.shuffle(mentions)
    return ["\n".join(mentions[i:i + cfg.per_doc]) for i in range(0, len(mentions), cfg.per_doc)]
