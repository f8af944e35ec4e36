"""`lmlab eval`: perplexity, multiple choice, world gold scores, win rate, and lm-eval through
the adapter and through `lmlab serve`. Numbers are checked against hand computations (one
forward per scored token, characters counted by hand) and against lm-eval itself."""
import json
import math
import os
import random

import pytest
import torch

from chartok import CharTokenizer

from lmlab.config import get_preset
from lmlab.eval.gold import world_scores
from lmlab.eval.multiple_choice import Question, multiple_choice
from lmlab.eval.perplexity import perplexity
from lmlab.eval.scoring import encode_pair, rolling_windows, score_pairs
from lmlab.eval.win_rate import Policy, judged_texts, pairwise, win_rate
from lmlab.errors import LmlabError
from lmlab.model import build_model
from lmlab.precision import resolve

# lm-eval and datasets must never reach the network here.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

TOK = CharTokenizer()
F32 = resolve("float32", "cpu")


def tiny(max_seq_len=16, seed=3, vocab=TOK.vocab_size):
    torch.manual_seed(seed)
    return build_model(get_preset("nano").replace(vocab_size=vocab, max_seq_len=max_seq_len)).eval()


def logp_next(model, context: list[int], token: int) -> float:
    """log p(token | context) from one plain forward: the hand reference."""
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0, -1].float()
    return float(logits.log_softmax(-1)[token])


# ---- rolling windows and perplexity --------------------------------------------------------

@pytest.mark.parametrize("n,max_len,stride", [(1, 4, 4), (4, 4, 4), (5, 4, 4), (10, 4, 4), (11, 4, 2),
                                              (23, 5, 1), (23, 5, 3), (7, 8, 8), (40, 6, 5)])
def test_rolling_windows_match_lm_eval_and_score_every_token_once(n, max_len, stride):
    tokens = list(range(10, 10 + n))
    windows = rolling_windows(tokens, 0, max_len, stride)
    scored = [t for _, cont in windows for t in cont]
    assert scored == tokens  # every token exactly once, in order
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= max_len and ctx  # fits, never without context
    assert windows[0][0] == [0]  # the first window starts from scratch
    utils = pytest.importorskip("lm_eval.utils")
    ref = [utils.make_disjoint_window(w) for w in
           utils.get_rolling_token_windows(tokens, 0, max_len, max_len - stride + 1)]
    assert [(list(a), list(b)) for a, b in ref] == windows


def test_rolling_windows_reject_bad_stride():
    with pytest.raises(LmlabError, match="stride"):
        rolling_windows([1, 2, 3], 0, 4, 5)


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_perplexity_is_exp_mean_nll_by_hand(stride):
    model = tiny(max_seq_len=12)
    docs = ["the quick brown fox jumps over the lazy dog, twice over!", "short one"]
    result = perplexity(model, TOK, docs, stride=stride, batch_size=3, precision=F32)
    L, s = 12, stride or 12
    nll, count = 0.0, 0
    for text in docs:
        seq = [TOK.bos_id] + TOK.encode(text)
        n = len(seq) - 1
        # The window predicting token j (seq[j+1]): the first holds j < L; then each `s` more.
        for j in range(n):
            if j < L:
                ctx = seq[: j + 1]
            else:
                end = min(L + ((j - L) // s + 1) * s, n)  # window predicts tokens [end - s, end)
                ctx = seq[end - L: j + 1]
            nll -= logp_next(model, ctx, seq[j + 1])
            count += 1
    assert result["tokens"] == count == sum(len(d) for d in docs)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    n_bytes = sum(len(d.encode()) for d in docs)
    words = sum(len(d.split()) for d in docs)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    if stride is None:  # the long document needs several windows
        assert len(rolling_windows(TOK.encode(docs[0]), 0, L)) >= 5


def test_score_pairs_padding_and_order_do_not_change_scores():
    model = tiny(max_seq_len=32)
    pairs = [([0] + TOK.encode("ab"), TOK.encode(" cde")), ([0], TOK.encode("x")),
             ([0] + TOK.encode("hello there"), TOK.encode("!"))]
    alone = [score_pairs(model, [p], batch_size=1)[0] for p in pairs]
    batched = score_pairs(model, pairs, batch_size=3)
    for (a, ga), (b, gb) in zip(alone, batched):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    ctx, cont = pairs[0]
    hand = sum(logp_next(model, ctx + cont[:i], cont[i]) for i in range(len(cont)))
    assert batched[0][0] == pytest.approx(hand, abs=1e-5)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    ctx, cont = encode_pair(TOK, "Q: sky? ", "blue")
    assert TOK.decode(ctx) == "<|bos|>Q: sky?" and TOK.decode(cont) == " blue"
    assert encode_pair(TOK, "", "hi") == ([TOK.bos_id], TOK.encode("hi"))


# ---- multiple choice -------------------------------------------------------------------------

def test_multiple_choice_acc_and_acc_norm_by_hand():
    model = tiny(max_seq_len=48)
    questions = [Question("Sky colour:", ("blue", "a very long green answer", "red"), 0),
                 Question("2+2=", ("4", "five", "22"), 1),
                 Question("Pick:", ("xx", "y"), 1),
                 Question("Cat says", ("meow", "woof woof", "moo"), 2)]
    result = multiple_choice(model, TOK, questions, precision=F32)
    acc = acc_norm = 0
    for q, d in zip(questions, result["details"]):
        head = [TOK.bos_id] + TOK.encode(q.query)
        lls = []
        for c in q.choices:
            cont = TOK.encode(" " + c)  # one token per character
            lls.append(sum(logp_next(model, head + cont[:i], cont[i]) for i in range(len(cont))))
        assert d["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        acc += max(range(len(lls)), key=lambda i: (lls[i], -i)) == q.gold
        norm = [lp / len(c) for lp, c in zip(lls, q.choices)]  # characters of the choice, no space
        acc_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == q.gold
    assert result["acc"] == acc / 4 and result["acc_norm"] == acc_norm / 4
    assert result["chance"] == pytest.approx((1 / 3 * 3 + 1 / 2) / 4)


def test_multiple_choice_task_file_errors(tmp_path):
    from lmlab.eval.multiple_choice import read_task

    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(LmlabError, match="gold"):
        read_task(bad)
    bad.write_text(json.dumps({"context": "q", "choices": ["a", "b"], "gold": 1}) + "\n")
    assert read_task(bad)[0].query == "q"


# ---- world gold scores ------------------------------------------------------------------------

def test_world_scores_sort_and_fact_by_hand():
    from lmlab.worlds.sort import sample_tasks

    tasks = sample_tasks(4, 0)
    rows = [{"prompt": t.prompt} for t in tasks]
    ideal = [" ".join(sorted(t.symbols)) for t in tasks]
    assert world_scores(rows, ideal, ["eos"] * 4) == {"gold_reward_dense": 1.0, "gold_reward_sparse": 1.0,
                                                      "exact_match": 1.0}
    # Not ended: the EOS part of the dense reward (0.2) is lost, and the sparse reward.
    cut = world_scores(rows, ideal, ["length"] * 4)
    assert cut["gold_reward_dense"] == pytest.approx(0.8) and cut["exact_match"] == 0.0
    facts = [{"prompt": "capital of x?", "answer": "Paris"}, {"prompt": "y?", "answer": "Rome"}]
    assert world_scores(facts, ["paris.", "Oslo"], ["eos", "eos"]) == {"exact_match": 0.5}


def test_world_eval_runs_the_eval_stage_path():
    from lmlab.eval.gold import world_eval
    from lmlab.worlds.sort import sample_tasks

    rows = [{"prompt": t.prompt, "base_prompt": t.base_prompt} for t in sample_tasks(3, 1)]
    model = tiny(max_seq_len=64)
    out = world_eval(model, TOK, rows, max_new_tokens=4, precision=F32)
    assert out["generated"] == 3 and 0.0 <= out["exact_match"] <= 1.0 and "gold_reward_dense" in out
    base = world_eval(model, TOK, rows, prompt_format="base", max_new_tokens=4, precision=F32)
    assert base["prompt_format"] == "base" and len(base["examples"]) == 3


# ---- win rate ---------------------------------------------------------------------------------

def test_pairwise_counts_ties_half():
    out = pairwise([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1])
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1)
    assert out["win_rate"] == pytest.approx((2 + 0.5) / 4)
    outcomes = [1, 0, 0.5, 1]
    mean = sum(outcomes) / 4
    assert out["win_rate_stderr"] == pytest.approx(math.sqrt(sum((o - mean) ** 2 for o in outcomes) / 3 / 4))
    assert pairwise([0.3], [0.31], tie_margin=0.05)["ties"] == 1


def test_gold_reward_is_told_which_answers_ended():
    from lmlab.rewards.base import GoldReward

    assert judged_texts(GoldReward(), ["a b", "c"], ["eos", "length"]) == ["a b<|end|>", "c"]
    assert judged_texts(GoldReward(ended=True), ["a b"], ["length"]) == ["a b"]


def test_win_rate_of_a_policy_against_itself_is_one_half():
    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.rewards.base import GoldReward
    from lmlab.worlds.sort import sample_tasks

    model = tiny(max_seq_len=64)
    policy = Policy(model, TOK, RoleTokenTemplate(TOK), "p")
    prompts = [t.prompt for t in sample_tasks(5, 2)]
    out = win_rate(policy, policy, prompts, GoldReward(), max_new_tokens=6, precision=F32)
    assert out["win_rate"] == 0.5 and out["ties"] == 5 and out["wins"] == out["losses"] == 0

    class Length:  # prefers longer answers: a judge whose verdicts can be checked by eye
        def score(self, prompts, completions):
            return torch.tensor([float(len(c)) for c in completions])

    other = Policy(tiny(max_seq_len=64, seed=11), TOK, RoleTokenTemplate(TOK), "q")
    out = win_rate(policy, other, prompts, Length(), max_new_tokens=6, precision=F32)
    a = [len(e["a"]) for e in out["examples"]]
    b = [len(e["b"]) for e in out["examples"]]
    expected = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    out3 = win_rate(policy, other, prompts[:3], Length(), max_new_tokens=6, precision=F32)
    assert out3["win_rate"] == pytest.approx(expected / 3)
