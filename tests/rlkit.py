"""Tiny policies and checkable rewards for the online-RL tests (PPO, GRPO, RLOO)."""
from __future__ import annotations

import json

import torch

from lmlab.config import ModelConfig
from lmlab.model.transformer import build_model
from lmlab.train.config import TrainConfig

from wordtok import WordTokenizer

TOK = WordTokenizer()
SYMBOLS = ("a", "b", "c", "d")


def tiny_config(vocab_size: int = TOK.vocab_size, max_seq_len: int = 32) -> ModelConfig:
    return ModelConfig(name="t", vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, max_seq_len=max_seq_len)


def tiny_policy(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_config(**kw))


class Bandit:
    """Two arms: answering "a" pays 1, "b" pays 0.2, anything else 0."""

    def score(self, prompts, completions):
        pay = {"a": 1.0, "b": 0.2}
        return torch.tensor([pay.get((c.split() or [""])[0], 0.0) for c in completions])


class NextSymbol:
    """A verifiable task: the answer to symbol x must begin with the next symbol
    (cyclically): a 0/1 checker, and each prompt has its own right answer."""

    def score(self, prompts, completions):
        nxt = {s: SYMBOLS[(i + 1) % len(SYMBOLS)] for i, s in enumerate(SYMBOLS)}
        return torch.tensor([float(c.split()[:1] == [nxt[p]]) for p, c in zip(prompts, completions)])


def train_cfg(steps: int, batch_size: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=batch_size, lr=1e-2, precision="float32", progress=False, log_every=1,
                weight_decay=0.0, schedule="constant")
    return TrainConfig(**{**base, **kw})


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def first_token_probs(policy, prompt: str):
    """The policy's next-token distribution after a chat prompt (temperature 1)."""
    from lmlab.train.rollout import encode_prompts

    ids = torch.tensor(encode_prompts([prompt], TOK))
    return torch.softmax(policy(ids)[0, -1].float(), -1)
