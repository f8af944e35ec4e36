import pytest
import torch

from lmlab.config import get_preset
from lmlab.decode.generate import generate
from lmlab.decode.proxy import influence_table, proxy_generate, proxy_scores, token_influence
from lmlab.decode.speculative import speculative_generate
from lmlab.errors import LmlabError
from lmlab.model import build_model


def make(seed, **changes):
    torch.manual_seed(seed)
    return build_model(get_preset("nano").replace(**changes)).eval()


@pytest.fixture(scope="module")
def trio():
    return make(1), make(2), make(3)


def dist(x):
    return x.softmax(-1)


def test_alpha_zero_or_equal_experts_give_the_base():
    b, e, a = torch.randn(3, 4, 50).unbind(0)
    torch.testing.assert_close(dist(proxy_scores(b, e, a, 0.0)), dist(b))
    torch.testing.assert_close(dist(proxy_scores(b, e, e, 1.7)), dist(b))


def test_base_equal_to_anti_gives_the_expert():
    b, e = torch.randn(2, 4, 50).unbind(0)
    torch.testing.assert_close(dist(proxy_scores(b, e, b, 1.0)), dist(e))


def test_constants_added_to_any_member_change_nothing():
    b, e, a = torch.randn(3, 4, 50).unbind(0)
    ref = dist(proxy_scores(b, e, a, 0.8))
    for shifted in ((b + 5, e, a), (b, e - 3, a), (b, e, a + 11)):
        torch.testing.assert_close(dist(proxy_scores(*shifted, 0.8)), ref)


def test_proxy_matches_logit_arithmetic_by_hand():
    b, e, a = torch.randn(3, 2, 7).unbind(0)
    expected = torch.softmax(b + 0.5 * (e - a), -1)  # the paper's formula on raw logits
    torch.testing.assert_close(dist(proxy_scores(b, e, a, 0.5)), expected)


def test_proxy_generation_reduces_to_members(trio):
    base, expert, anti = trio
    prompts = [[1, 2, 3], [9]]
    plain = [g.tokens for g in generate(base, prompts, 8)]
    assert [g.tokens for g in proxy_generate(base, expert, anti, prompts, 8, alpha=0.0)] == plain
    assert [g.tokens for g in proxy_generate(base, expert, expert, prompts, 8)] == plain
    only_expert = [g.tokens for g in generate(expert, prompts, 8)]
    assert [g.tokens for g in proxy_generate(anti, expert, anti, prompts, 8)] == only_expert


def test_proxy_logprobs_are_the_combined_distribution(trio):
    base, expert, anti = trio
    g = proxy_generate(base, expert, anti, [[4, 5]], 3, alpha=1.0)[0]
    ids = torch.tensor([[4, 5] + g.tokens])
    with torch.no_grad():
        scores = proxy_scores(base(ids)[0], expert(ids)[0], anti(ids)[0], 1.0).log_softmax(-1)
    expected = [float(scores[1 + i, t]) for i, t in enumerate(g.tokens)]
    assert g.logprobs == pytest.approx(expected, abs=1e-4)


def test_vocabulary_mismatch_is_refused_with_both_sizes(trio):
    base, expert, _ = trio
    bigger = make(4, vocab_size=520)
    with pytest.raises(LmlabError, match=r"base has 512.*anti-expert has 520"):
        proxy_generate(base, expert, bigger, [[1]], 2)
    out = proxy_generate(base, expert, bigger, [[1]], 2, truncate_vocab=True)[0]
    assert all(t < 512 for t in out.tokens)


def test_token_influence_table(trio):
    base, expert, anti = trio
    rows = token_influence(base, expert, anti, [[1, 2]], [[5, 6, 5]], decode=lambda ids: f"t{ids[0]}")
    assert {r["token_id"] for r in rows} == {5, 6} and rows[0]["mean_shift"] >= rows[-1]["mean_shift"]
    assert "| 't5' |" in influence_table(rows)


# ---- speculative decoding ----------------------------------------------------------------

def test_speculative_greedy_equals_target_greedy(trio):
    target, draft, _ = trio
    prompt = [3, 1, 4, 1, 5]
    expected = generate(target, [prompt], 20)[0].tokens
    for k in (1, 3, 5):
        out = speculative_generate(target, draft, prompt, 20, k=k)
        assert out.tokens == expected
    self_draft = speculative_generate(target, target, prompt, 20, k=4)
    assert self_draft.tokens == expected and self_draft.acceptance_rate == 1.0


def test_speculative_sampling_preserves_the_target_distribution():
    """Chi-square over the first two tokens, on a 6-token vocabulary, against the exact
    target distribution p(t1) p(t2 | t1)."""
    cfg = dict(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32, init_std=0.5)
    target, draft = make(10, **cfg), make(11, **cfg)
    prompt = [0, 1]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.zeros(6, 6)
        for t1 in range(6):
            p2 = target(torch.tensor([prompt + [t1]]))[0, -1].softmax(-1)
            exact[t1] = p1[t1] * p2
    n = 3000
    counts = torch.zeros(6, 6)
    accepted = proposed = 0
    for seed in range(n):
        out = speculative_generate(target, draft, prompt, 2, k=2, temperature=1.0, seed=seed)
        counts[out.tokens[0], out.tokens[1]] += 1
        accepted, proposed = accepted + out.accepted, proposed + out.proposed
    expected = exact * n
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    dof = int(keep.sum()) - 1
    # 99.9th percentile of chi-square is below dof + 4.5 * sqrt(2 * dof) for these sizes
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5, (chi2, dof)
    assert 0 < accepted < proposed  # the draft really was tested, and it is not the target
