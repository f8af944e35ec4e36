"""Rollouts: a batch source for the one loop that generates its batches from the policy.

    source = Rollouts(policy, tokenizer, prompts, reward, RolloutConfig(...), objective)
    train(policy, objective, source, train_cfg, run_dir)

Each rollout samples `group_size` completions for each of `prompts` prompts with the batched
KV-cache engine (`lmlab.decode.generate`), scores them with any `Reward`, and recomputes, in
one no-grad pass over the whole rollout, what the update needs: the policy's log-probs of
the sampled tokens (the "old" policy), the reference's, and the critic's values. The
objective then turns scores into advantages (`objective.advantages`). The rollout is a
buffer the loop reads `epochs` times in shuffled minibatches of its micro-batch size, so
the rollout size is independent of what fits in memory for a backward pass.

Sampling is at `temperature` with no truncation (no top-k/top-p): the log-probs the
objectives use are computed at that same temperature, so the sampler's distribution and
the one the ratio and the KL read are the same one. The largest gap between the sampler's
log-probs and the training forward's (both at temperature 1) is reported as `max_dlogp`:
it is numerical (KV cache vs full forward, precision), and large values mean the ratio
of the first minibatch is not 1.

Row layout: prompt then completion, right-padded, so the causal mask alone hides the
padding (the fused path) and positions count real tokens as in the sampler, where prompts
were left-padded. A row's targets are its completion tokens (the stop token included);
prompt and padding targets are IGNORE_INDEX. Per-row values the objective logs (rollout
statistics) travel as `stat_<name>` tensors of shape (B,).

On-policy rollouts skip the scoring forward: when a rollout is read once (one epoch) in one
micro-batch, that micro-batch's forward runs at the very weights that sampled it, so its
log-probs, detached, are the old log-probs (the ratio is exactly 1; TRL's GRPOTrainer does
the same with num_iterations=1). If the objective also needs nothing else from the
rollout's own forward (`reads_rollout_forward` false: no critic, no old log-probs in the
advantages) and keeps no reference, the batch carries no `old_logp`, and `sampler_logp`
(the sampler's log-probs, temperature 1) instead, from which the objective reports
`max_dlogp`. Several epochs, several micro-batches, a critic or a reference keep the
scoring forward.

Resume: the state is the number of rollouts made, the cursor into the current one and the
buffer itself (safetensors bytes, base64), so a run stopped between two minibatches of one
rollout continues with exactly that rollout. Sampling seeds derive from (seed, rollout).
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load as load_tensors, save as save_tensors

from lmlab.data import IGNORE_INDEX
from lmlab.data.chat import JinjaTemplate, RoleTokenTemplate
from lmlab.decode.generate import generate
from lmlab.errors import LmlabError
from lmlab.tokenizer import ROLE_TOKENS
from lmlab.train.logprobs import masked_logprobs, row_logprobs


@dataclass(frozen=True)
class RolloutConfig:
    prompts: int = 16  # prompts per rollout
    group_size: int = 4  # completions sampled per prompt (G)
    max_new_tokens: int = 32
    temperature: float = 1.0  # > 0; the objectives' log-probs use the same temperature
    epochs: int = 1  # passes over each rollout (PPO epochs)
    forward_batch: int = 64  # rows per no-grad forward when scoring a rollout
    format_penalty: float = 0.0  # subtracted from the reward of a completion that never stopped
    # reward of an empty completion (None: the reward's own score, or for a reward model,
    # which cannot score one, the rollout's lowest)
    empty_score: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts", "group_size", "max_new_tokens", "epochs", "forward_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LmlabError(f"rollout.{name} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            raise LmlabError(f"rollout.temperature must be > 0 (online RL samples; greedy has no "
                             f"log-prob ratio), got {self.temperature!r}")
        if self.format_penalty < 0:
            raise LmlabError(f"rollout.format_penalty must be >= 0, got {self.format_penalty}")

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


def chat_template(template: str, tokenizer):
    """None for plain text ("none"), lmlab's role tokens ("lmlab"), or a stored template (a path)."""
    if template == "none":
        return None
    if template == "lmlab":
        return RoleTokenTemplate(tokenizer)
    return JinjaTemplate.from_tokenizer_config(template, tokenizer)


def encode_prompts(prompts: Sequence[str], tokenizer, template: str = "lmlab") -> list[list[int]]:
    """Token ids generation continues: the chat template's user turn and assistant header,
    or BOS + plain text ("none")."""
    tpl = chat_template(template, tokenizer)
    if tpl is None:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return [bos + list(tokenizer.encode(p)) for p in prompts]
    return [list(tpl.encode_prompt([{"role": "user", "content": p}])) for p in prompts]


def stop_id(tokenizer, template: str = "lmlab") -> int | None:
    """The token that ends an answer: the template's end of turn, else the tokenizer's EOS."""
    tpl = chat_template(template, tokenizer)
    stops = tpl.stop_ids if tpl is not None else []
    return stops[0] if stops else tokenizer.eos_id


def layout(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
           pad_id: int) -> dict[str, torch.Tensor]:
    """Rows `prompt + completion`, right-padded: `input_ids` = row[:-1] and `targets` =
    row[1:] where the target is a completion token, IGNORE_INDEX elsewhere; both (N, W-1)."""
    if len(prompt_ids) != len(completions):
        raise LmlabError(f"{len(prompt_ids)} prompts but {len(completions)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), IGNORE_INDEX, dtype=torch.long)
    for i, (row, p, c) in enumerate(zip(rows, prompt_ids, completions)):
        if not c:
            raise LmlabError(f"row {i} has no completion token; every sampled completion has at least one")
        ids[i, :len(row)] = torch.as_tensor(row)
        start = len(p) - 1  # targets[j] is row[j + 1]
        targets[i, start:start + len(c)] = torch.as_tensor(list(c))
    return {"input_ids": ids[:, :-1].contiguous(), "targets": targets}


def last_target_index(targets: torch.Tensor) -> torch.Tensor:
    """(N,) position of each row's last completion token: where a sequence reward lands."""
    mask = targets != IGNORE_INDEX
    slots = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, slots, -1).max(-1).values
    if bool((last < 0).any()):
        raise LmlabError("a rollout row has no completion token")
    return last


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut per-token tensors (N, T) after the last column any row has a target in."""
    mask = batch["targets"] != IGNORE_INDEX
    width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    t = batch["targets"].shape[1]
    return {k: (v[:, :width] if v.dim() == 2 and v.shape[1] == t else v) for k, v in batch.items()}


def _stats(n: int, values: dict[str, float]) -> dict[str, torch.Tensor]:
    return {f"stat_{k}": torch.full((n,), float(v)) for k, v in values.items()}


class Rollouts:
    """A generating batch source (see the module docstring).

    objective: provides `temperature`, `reference` (a module or None), `values(batch, hidden)`
        (per-token values (B, T) or None: no critic) and `advantages(batch)` (fills the
        advantage fields from `score`, `old_logp`, `ref_logp`, `old_values`).
    gold: a second reward only logged (e.g. the world's gold reward while training against a
        learned one: the reward-hacking curve).
    """

    def __init__(self, policy, tokenizer, prompts: Sequence[str], reward, cfg: RolloutConfig, objective,
                 *, gold=None, template: str = "lmlab", log: Callable[[str], None] | None = None) -> None:
        prompts = list(prompts)
        if not prompts:
            raise LmlabError("online RL needs prompts: give a JSONL of {\"prompt\": ...} records (the world "
                             "stage's eval.jsonl or sft.jsonl)")
        if not hasattr(reward, "score"):
            raise LmlabError(f"the reward must have score(prompts, completions), got {type(reward).__name__}")
        temperature = getattr(objective, "temperature", cfg.temperature)
        if temperature != cfg.temperature:
            raise LmlabError(f"the objective computes log-probs at temperature {temperature} but rollouts sample "
                             f"at {cfg.temperature}; use one temperature for both")
        check_reward_vocab(reward, policy, tokenizer)
        self.policy, self.tokenizer, self.prompts, self.reward = policy, tokenizer, prompts, reward
        self.cfg, self.objective, self.gold, self.template, self.log = cfg, objective, gold, template, log
        self.prompt_ids = encode_prompts(prompts, tokenizer, template)
        self.stop = stop_id(tokenizer, template)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        from lmlab.rewards.base import GoldReward

        # A world's checker reads whether the answer ended from the END marker in its text;
        # a learned reward's template closes the answer itself.
        self.mark_end = isinstance(reward, GoldReward) and reward.ended is None
        self.made = 0  # rollouts generated so far
        self.cursor = 0  # rows of the current buffer's order already served
        self.buffer: dict[str, torch.Tensor] | None = None
        self.generate_seconds = 0.0  # this session's time in the sampler (not checkpointed: a timing)

    # ---------------------------------------------------------------- prompts and order
    def _prompt_batch(self, k: int) -> list[int]:
        """Indices of the prompts of rollout k: a reshuffled pass over the prompts per epoch."""
        n = len(self.prompts)
        out = []
        for pos in range(k * self.cfg.prompts, (k + 1) * self.cfg.prompts):
            epoch, offset = divmod(pos, n)
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7919 * epoch + 1)
            out.append(int(torch.randperm(n, generator=g)[offset]))
        return out

    def _order(self, k: int) -> torch.Tensor:
        rows = self.cfg.rows
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 104_729 * k + 2)
        return torch.cat([torch.randperm(rows, generator=g) for _ in range(self.cfg.epochs)])

    # ---------------------------------------------------------------- one rollout
    def _texts(self, gens) -> list[str]:
        skip = {self.stop, self.tokenizer.eos_id}
        out = []
        for g in gens:
            body = [t for t in (g.tokens[:-1] if g.finish_reason == "eos" else g.tokens) if t not in skip]
            text = self.tokenizer.decode(body)
            if self.mark_end and g.finish_reason == "eos":
                text = text + ROLE_TOKENS["end"]
            out.append(text)
        return out

    def _score(self, reward, prompts: list[str], texts: list[str]) -> torch.Tensor:
        """The reward of each completion. An empty one gets `empty_score`; without it, the
        reward's own score where it can give one, else (a learned reward model) the lowest
        score of the rollout's other completions: saying nothing is never better."""
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if not empty or (self.cfg.empty_score is None and getattr(reward, "scores_empty", True)):
            return reward.score(prompts, texts).float()
        scores = torch.zeros(len(texts))
        keep = [i for i in range(len(texts)) if i not in set(empty)]
        if keep:
            scores[keep] = reward.score([prompts[i] for i in keep], [texts[i] for i in keep]).float()
        fill = self.cfg.empty_score if self.cfg.empty_score is not None else (
            float(scores[keep].min()) if keep else 0.0)
        scores[empty] = float(fill)
        return scores

    def on_policy(self, n: int) -> bool:
        """Whether rollouts served in micro-batches of `n` may skip the scoring forward
        (see the module docstring)."""
        return (self.cfg.epochs == 1 and n == self.cfg.rows
                and not getattr(self.objective, "reads_rollout_forward", True)
                and getattr(self.objective, "reference", None) is None)

    @torch.no_grad()
    def make_rollout(self, k: int, on_policy: bool = False) -> dict[str, torch.Tensor]:
        """Rollout k. `on_policy`: skip the scoring forward (only valid when `on_policy(n)`
        holds for the micro-batch size it will be read in)."""
        cfg, policy = self.cfg, self.policy
        t0 = time.perf_counter()
        chosen = [i for i in self._prompt_batch(k) for _ in range(cfg.group_size)]
        prompt_ids = [self.prompt_ids[i] for i in chosen]
        gens = generate(policy, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                        eos_id=self.stop, seed=cfg.seed * 1_000_003 + k, pad_id=self.pad_id)
        t_gen = time.perf_counter() - t0
        self.generate_seconds += t_gen
        prompts = [self.prompts[i] for i in chosen]
        texts = self._texts(gens)
        ended = torch.tensor([g.finish_reason == "eos" for g in gens])
        raw = self._score(self.reward, prompts, texts)
        score = raw - cfg.format_penalty * (~ended).float()
        batch = layout(prompt_ids, [g.tokens for g in gens], self.pad_id)
        batch["score"] = score
        sampler = torch.zeros(batch["targets"].shape)
        for i, g in enumerate(gens):
            start = len(prompt_ids[i]) - 1
            sampler[i, start:start + len(g.tokens)] = torch.tensor(g.logprobs)
        device = next(policy.parameters()).device
        fields: dict[str, list[torch.Tensor]] = {"old_logp": [], "ref_logp": [], "old_values": []}
        max_dlogp: float | None = 0.0
        ref = getattr(self.objective, "reference", None)
        if on_policy:
            batch["sampler_logp"] = sampler
            max_dlogp = None  # measured by the objective on the update's own forward
        for s in range(0, 0 if on_policy else cfg.rows, cfg.forward_batch):
            part = trim({"input_ids": batch["input_ids"][s:s + cfg.forward_batch],
                         "targets": batch["targets"][s:s + cfg.forward_batch]})
            ids, tg = part["input_ids"].to(device), part["targets"].to(device)
            width = batch["targets"].shape[1]
            lp = masked_logprobs(policy, ids, tg, temperature=cfg.temperature, keep_hidden=True)
            if cfg.temperature == 1.0:
                unit = lp.tokens
            else:
                rows, _, _ = row_logprobs(policy, lp.hidden[lp.mask], tg[lp.mask])
                unit = torch.zeros_like(lp.tokens).masked_scatter(lp.mask, rows)
            gap = torch.where(lp.mask, unit.float().cpu() - sampler[s:s + cfg.forward_batch, :tg.shape[1]], 0.0)
            max_dlogp = max(max_dlogp, float(gap.abs().max()))
            fields["old_logp"].append(_widen(lp.tokens, width))
            if ref is not None:
                fields["ref_logp"].append(_widen(masked_logprobs(ref, ids, tg, temperature=cfg.temperature).tokens,
                                                 width))
            values = self.objective.values({"input_ids": ids, "targets": tg}, lp.hidden)
            if values is not None:
                fields["old_values"].append(_widen(torch.where(lp.mask, values.float(), 0.0), width))
        for name, parts in fields.items():
            if parts:
                batch[name] = torch.cat(parts)
        batch.update(self.objective.advantages(batch))
        mask = batch["targets"] != IGNORE_INDEX
        lengths = mask.sum(-1).float()
        stats = {"reward": float(score.mean()), "reward_std": float(score.std(correction=0)),
                 "ended": float(ended.float().mean()), "length": float(lengths.mean()), "gen_s": t_gen}
        if max_dlogp is not None:
            stats["max_dlogp"] = max_dlogp
        if "ref_logp" in batch:
            stats["kl"] = float(torch.where(mask, batch["old_logp"] - batch["ref_logp"], 0.0).sum(-1).mean())
        if self.gold is not None:
            gold_texts = texts
            if not self.mark_end:
                gold_texts = [t + ROLE_TOKENS["end"] if e else t for t, e in zip(texts, ended.tolist())]
            gold = self.gold.score(prompts, gold_texts).float()
            stats["gold"] = float(gold.mean())
        stats["rollout_s"] = time.perf_counter() - t0
        batch.update(_stats(cfg.rows, stats))
        if self.log is not None:
            gap = "" if max_dlogp is None else f"max |dlogp| {max_dlogp:.2e}, "
            self.log(f"rollout {k}: reward {stats['reward']:.3f}, length {stats['length']:.1f}, "
                     f"{gap}{stats['rollout_s']:.2f} s")
        return batch

    # ---------------------------------------------------------------- the source protocol
    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        if self.cfg.rows % n:
            raise LmlabError(f"a rollout of {self.cfg.rows} rows ({self.cfg.prompts} prompts x {self.cfg.group_size}) "
                             f"does not split into micro-batches of {n}; make train.micro_batch_size divide it")
        order_len = self.cfg.rows * self.cfg.epochs
        if self.buffer is None or self.cursor >= order_len:
            self.buffer = self.make_rollout(self.made, on_policy=self.on_policy(n))
            self.made += 1
            self.cursor = 0
        rows = self._order(self.made - 1)[self.cursor:self.cursor + n]
        self.cursor += n
        return trim({k: v[rows] for k, v in self.buffer.items()})

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"made": self.made, "cursor": self.cursor}
        if self.buffer is not None:
            tensors = {k: v.contiguous().cpu() for k, v in self.buffer.items()}
            state["buffer"] = base64.b64encode(save_tensors(tensors)).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.made, self.cursor = int(state["made"]), int(state["cursor"])
        self.buffer = load_tensors(base64.b64decode(state["buffer"])) if state.get("buffer") else None


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    x = x.float().cpu()
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def check_reward_vocab(reward, policy, tokenizer) -> None:
    """A learned reward must read the policy's tokens with the policy's vocabulary: a reward
    model from another tokenizer scores text it was never trained on (and a value head
    from another vocabulary cannot read the rollout's ids at all)."""
    from lmlab.rewards.base import EnsembleReward, ModelReward

    members = reward.members if isinstance(reward, EnsembleReward) else [reward]
    for m in members:
        if not isinstance(m, ModelReward):
            continue
        theirs = m.rm.config.vocab_size
        ours = policy.config.vocab_size
        tok_theirs = getattr(m.tokenizer, "vocab_size", None)
        tok_ours = getattr(tokenizer, "vocab_size", None)
        if theirs != ours or (tok_theirs is not None and tok_ours is not None and tok_theirs != tok_ours):
            raise LmlabError(f"the reward model has a vocabulary of {theirs} tokens (tokenizer {tok_theirs}) but the "
                             f"policy {ours} (tokenizer {tok_ours}): train the reward model from the policy's SFT "
                             "model (`lmlab reward train` with base: the sft model) so both read the same tokens")
