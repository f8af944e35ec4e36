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


# ---- lm-eval: through the adapter and through `lmlab serve` ------------------------------------

TASK_YAML = """task: lmlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "maple", "robot", "candle", "frost"]


def mc_rows(n=12, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = rng.sample(WORDS, 4)
        rows.append({"query": f"item {i} {WORDS[i]} is", "choices": choices, "gold": rng.randrange(4)})
    return rows


def train_on_answers(model, tok, rows, steps=80):
    """Eighty steps of next-token loss on each query's gold continuation only."""
    from lmlab.data import IGNORE_INDEX
    from lmlab.train.logprobs import masked_logprobs

    pairs = [encode_pair(tok, r["query"], " " + r["choices"][r["gold"]], add_special_tokens=False) for r in rows]
    width = max(len(c) + len(t) - 1 for c, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    targets = torch.full((len(pairs), width), IGNORE_INDEX)
    for i, (c, t) in enumerate(pairs):
        full = c + t
        ids[i, : len(full) - 1] = torch.tensor(full[:-1])
        targets[i, len(c) - 1: len(full) - 1] = torch.tensor(t)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        lp = masked_logprobs(model, ids, targets)
        loss = -lp.tokens.sum() / lp.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on a local MC task's answers, saved with its BPE tokenizer."""
    from lmlab.checkpoint import save_model
    from lmlab.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("mc")
    os.environ["HF_HOME"] = str(root / "hf")  # datasets' cache of the local JSON, not ~/.cache
    rows = mc_rows()
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "lmlab_mc.yaml").write_text(TASK_YAML.format(data=data))
    texts = [r["query"] + " " + c for r in rows for c in r["choices"]]
    tok = train_tokenizer(texts * 4, 300)
    torch.manual_seed(0)
    model = build_model(get_preset("nano").replace(vocab_size=tok.vocab_size, max_seq_len=64))
    untrained = multiple_choice(model.eval(), tok, [Question(r["query"], tuple(r["choices"]), r["gold"])
                                                    for r in rows], add_special_tokens=False, precision=F32)
    train_on_answers(model, tok, rows)
    save_model(model, root / "model", tokenizer=tok)
    return {"root": root, "rows": rows, "tok": tok, "model": model, "data": data, "untrained": untrained}


@pytest.fixture(scope="module")
def mc_setup(trained):
    pytest.importorskip("lm_eval")
    return trained


def flat(rows):
    return [x for row in rows for x in row]


def run_lm_eval(setup, model, model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmlab.eval.lm_eval_adapter import register

    register()
    manager = TaskManager(include_path=str(setup["root"] / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lmlab_mc"], task_manager=manager,
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["lmlab_mc"], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return out["results"]["lmlab_mc"], lls


def test_lm_eval_scores_a_local_task_identically_through_the_adapter_and_the_server(mc_setup):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import threading
    import time

    from lmlab.eval.multiple_choice import read_task
    from lmlab.serve.app import ServeConfig, create_app
    from lmlab.serve.server import build_server

    start = time.monotonic()
    direct, direct_lls = run_lm_eval(mc_setup, "lmlab", f"pretrained={mc_setup['root'] / 'model'},"
                                                        "add_bos_token=False,precision=float32,batch_size=8")
    # Our own `lmlab eval mc` on the same JSONL: the same log-likelihoods, the same metrics.
    ours = multiple_choice(mc_setup["model"], mc_setup["tok"], read_task(mc_setup["data"]),
                           add_special_tokens=False, precision=F32)
    assert flat(d["loglikelihoods"] for d in ours["details"]) == pytest.approx(flat(direct_lls), abs=1e-4)
    assert (ours["acc"], ours["acc_norm"]) == (direct["acc,none"], direct["acc_norm,none"])

    app = create_app(mc_setup["model"], mc_setup["tok"], ServeConfig(model_name="tiny", max_batch=4))
    server = build_server(app, "127.0.0.1", 0, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/tokenizer_info", timeout=10) as resp:
            info = json.loads(resp.read())
        assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<|bos|>", "<|eos|>", 64)
        # No tokenizer given: lm-eval finds /tokenizer_info and tokenizes through /tokenize.
        served, served_lls = run_lm_eval(mc_setup, "local-completions",
                                         f"base_url=http://127.0.0.1:{port}/v1/completions,model=tiny,"
                                         "num_concurrent=1,max_retries=1,timeout=30")
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(served_lls) == len(direct_lls) == 12
    assert flat(served_lls) == pytest.approx(flat(direct_lls), abs=1e-4)
    assert served["acc,none"] == direct["acc,none"] and served["acc_norm,none"] == direct["acc_norm,none"]
    # Trained on the answers: far above chance (1/4), and above the untrained model.
    assert direct["acc,none"] >= 0.75 > mc_setup["untrained"]["acc"]
    assert time.monotonic() - start < 60


def test_lm_eval_rolling_and_generation_through_the_adapter(mc_setup):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lmlab.decode.generate import generate
    from lmlab.eval.lm_eval_adapter import LmlabLM
    from lmlab.eval.perplexity import document_loglikelihoods

    tok, model = mc_setup["tok"], mc_setup["model"]
    lm = LmlabLM(model=model, tokenizer=tok, precision="float32", max_length=16)
    text = " ".join(r["query"] for r in mc_setup["rows"])  # many windows of 16
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (rolled,) = lm.loglikelihood_rolling([req])
    # By hand: every token once, each conditioned on its lm-eval window.
    tokens = tok.encode(text)
    seq = [tok.bos_id] + tokens
    hand = 0.0
    for j in range(len(tokens)):
        ctx = seq[: j + 1] if j < 16 else seq[min(16 * ((j // 16) + 1), len(tokens)) - 16: j + 1]
        hand += logp_next(model, ctx, seq[j + 1])
    assert rolled == pytest.approx(hand, abs=1e-3)
    assert document_loglikelihoods(model, tok, [text], max_len=16)[0][0] == pytest.approx(rolled, abs=1e-4)
    prompt = mc_setup["rows"][0]["query"]
    gen = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 5}), 0)
    (answer,) = lm.generate_until([gen])
    ids = tok.encode(prompt, add_special_tokens=True)
    ref = generate(model, [ids], 5, eos_id=tok.eos_id, stop=["\n"], decode=tok.decode)[0].text
    assert answer == ref


# ---- the CLI ----------------------------------------------------------------------------------

def test_cli_eval_commands(trained, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.worlds.export import export_world

    model = str(trained["root"] / "model")
    out = tmp_path / "mc.json"
    assert main(["eval", "mc", model, str(trained["data"]), "--no-bos", "--precision", "float32",
                 "--out", str(out)]) == 0
    assert "acc_norm" in capsys.readouterr().out
    mc = json.loads(out.read_text())
    assert mc["questions"] == 12 and mc["acc"] >= 0.75 and len(mc["details"]) == 12

    corpus = tmp_path / "corpus.jsonl"
    docs = [r["query"] * 3 for r in trained["rows"][:3]]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", model, str(corpus), "--window", "16", "--stride", "8", "--out", str(out)]) == 0
    ppl = json.loads(out.read_text())
    assert ppl["tokens"] == sum(len(trained["tok"].encode(d)) for d in docs) and ppl["stride"] == 8
    assert ppl["token_perplexity"] == pytest.approx(math.exp(ppl["nll"] / ppl["tokens"]))

    world = tmp_path / "world"
    export_world("sort", world, seed=0, n=40)  # 4 eval prompts
    out = tmp_path / "gold.json"
    assert main(["eval", "gold", model, str(world), "--limit", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    gold = json.loads(out.read_text())
    assert gold["generated"] == 3 and {"gold_reward_dense", "gold_reward_sparse", "exact_match"} <= set(gold)
    out = tmp_path / "win.json"
    assert main(["eval", "win-rate", model, model, str(world), "--reward", "gold", "--limit", "3",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["win_rate"] == 0.5
    capsys.readouterr()
    assert main(["eval", "mc", model, str(tmp_path / "missing.jsonl")]) == 2
    assert "task file not found" in capsys.readouterr().err


def test_cli_lm_eval_runs_a_local_task_through_the_adapter(mc_setup, tmp_path, capsys):
    from lmlab.cli import main

    out = tmp_path / "lm_eval.json"
    assert main(["eval", "lm-eval", str(mc_setup["root"] / "model"), "--tasks", "lmlab_mc", "--include-path",
                 str(mc_setup["root"] / "tasks"), "--no-bos", "--precision", "float32", "--out", str(out)]) == 0
    assert "lmlab_mc" in capsys.readouterr().out
    result = json.loads(out.read_text())["results"]["lmlab_mc"]
    ours = multiple_choice(mc_setup["model"], mc_setup["tok"],
                           [Question(r["query"], tuple(r["choices"]), r["gold"]) for r in mc_setup["rows"]],
                           add_special_tokens=False, precision=F32)
    assert (result["acc,none"], result["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
