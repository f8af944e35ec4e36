import pytest
import torch

from lmlab.config import get_preset
from lmlab.model import build_model
from lmlab.model.moe import MoE, _padded_bmm, collect_aux_losses, grouped_linear
from lmlab.summary import parameter_counts
from lmlab.train.objectives.lm import LanguageModeling

transformers = pytest.importorskip("transformers")
from hf_oracle import TOL, hf_logits, incremental_logits, max_diff, tiny_hf_model  # noqa: E402


def tiny_mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    args = dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64)
    return tiny_hf_model(MixtralForCausalLM, MixtralConfig, **{**args, **kw})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from lmlab.interop.hf import load_hf_model

    hf = tiny_mixtral()
    path = tmp_path_factory.mktemp("mixtral")
    hf.save_pretrained(path)
    return hf, load_hf_model(path).eval()


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def test_logits_match_transformers(converted):
    hf, ours = converted
    ref = hf_logits(hf, IDS)
    with torch.no_grad():
        assert max_diff(ours(IDS), ref) <= TOL
    assert max_diff(incremental_logits(ours, IDS, prefill=4), ref) <= TOL


def test_router_picks_the_same_experts_token_by_token(converted):
    hf, ours = converted
    picked = {"hf": [], "ours": []}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: picked["hf"].append(o[2].sort(-1).values))
             for layer in hf.model.layers]
    hooks += [block.mlp.register_forward_hook(
        lambda m, i, o: picked["ours"].append(m.route(i[0].reshape(-1, i[0].shape[-1]))[1].sort(-1).values))
        for block in ours.layers]
    with torch.no_grad():
        hf_logits(hf, IDS)
        ours(IDS)
    for h in hooks:
        h.remove()
    assert len(picked["hf"]) == len(picked["ours"]) == 2
    for a, b in zip(picked["hf"], picked["ours"]):
        assert torch.equal(a, b)


def test_fused_layout_loads_too(converted, tmp_path):
    """transformers' in-memory layout (fused gate_up_proj, `mlp.gate` router), as written by
    save_pretrained(save_original_format=False), converts to the same logits."""
    from safetensors import safe_open

    from lmlab.interop.hf import load_hf_model

    hf, _ = converted
    hf.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    ours = load_hf_model(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(ours(IDS), hf_logits(hf, IDS)) <= TOL


def test_export_loads_in_transformers(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmlab.interop.hf import save_hf

    hf, ours = converted
    save_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert max_diff(hf_logits(back, IDS), hf_logits(hf, IDS)) <= TOL


def test_perturbations_are_caught(converted):
    hf, ours = converted
    ref = hf_logits(hf, IDS)
    moe = ours.layers[0].mlp
    # wrong expert permutation: swap two experts' gate weights
    with torch.no_grad():
        saved = moe.gate_proj.weight.clone()
        moe.gate_proj.weight[[0, 1]] = moe.gate_proj.weight[[1, 0]]
        assert max_diff(ours(IDS), ref) > 1e-3
        moe.gate_proj.weight.copy_(saved)
    # top-k weights without renormalisation
    route = MoE.route

    def unnormalised(self, x):
        logits = self.router(x)
        w, e = logits.float().softmax(-1).topk(self.top_k, -1)
        return logits, e, w

    MoE.route = unnormalised
    try:
        with torch.no_grad():
            assert max_diff(ours(IDS), ref) > 1e-3
    finally:
        MoE.route = route
    with torch.no_grad():
        assert max_diff(ours(IDS), ref) <= TOL


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition, with no dispatch tricks."""
    _, experts, weights = moe.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t]):
            h = torch.nn.functional.silu(moe.gate_proj.weight[e] @ x[t]) * (moe.up_proj.weight[e] @ x[t])
            out[t] += w * (moe.down_proj.weight[e] @ h)
    return out


def test_dispatch_is_dropless_and_matches_the_definition():
    cfg = get_preset("nano").replace(n_experts=5, top_k=3, ffn_hidden=24)
    model = build_model(cfg)
    moe = model.layers[0].mlp
    x = torch.randn(37, cfg.d_model)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert collect_aux_losses(model)["moe_load_imbalance"] >= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_equals_padded_bmm_with_empty_groups(dtype):
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])
    a = grouped_linear(x, w, counts)
    ref = torch.cat([x[:3] @ w[0].T, x[3:] @ w[2].T])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(a, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(_padded_bmm(x, w, counts), ref, atol=tol, rtol=tol)
    g = torch.randn_like(a)
    ga = torch.autograd.grad((a * g).sum(), (x, w))
    gr = torch.autograd.grad((ref * g).sum(), (x, w))
    for u, v in zip(ga, gr):
        torch.testing.assert_close(u, v, atol=tol * 10, rtol=tol * 10)


def test_aux_loss_equals_transformers(converted):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf, ours = converted
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o[0])) for layer in hf.model.layers]
    with torch.no_grad():
        hf_logits(hf, IDS)
        ours(IDS)
    for h in hooks:
        h.remove()
    expected = load_balancing_loss_func(tuple(logits), num_experts=6, top_k=2)
    aux = collect_aux_losses(ours)
    torch.testing.assert_close(aux["moe_aux_loss"], expected, atol=1e-5, rtol=1e-5)
    z = torch.cat(logits).logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(aux["moe_z_loss"], z, atol=1e-5, rtol=1e-5)


def test_objective_adds_weighted_aux_losses():
    cfg = get_preset("nano").replace(n_experts=4, top_k=2, moe_aux_loss_weight=0.5, moe_z_loss_weight=0.1)
    model = build_model(cfg)
    batch = torch.randint(0, 512, (2, 9))
    loss, metrics = LanguageModeling()(model, batch)
    expected = metrics["loss"] + 0.5 * metrics["moe_aux_loss"] + 0.1 * metrics["moe_z_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,total,active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("mixtral-8x22b", 141e9, 39e9)])
def test_mixtral_parameter_counts(name, total, active):
    counts = parameter_counts(get_preset(name))
    assert abs(counts["total"] - total) / total < 0.005
    assert abs(counts["active"] - active) / active < 0.005


def test_validation_loss_leaves_out_the_router_losses():
    """evaluate() reports the task loss: a MoE's balancing and z losses regularise training
    but must not inflate its validation loss against a dense model's."""
    from lmlab.train.config import TrainConfig
    from lmlab.train.loop import evaluate

    torch.manual_seed(0)
    cfg = get_preset("nano").replace(n_experts=4, top_k=2, ffn_hidden=32, moe_aux_loss_weight=1.0,
                                     moe_z_loss_weight=1.0)
    model = build_model(cfg)
    batch = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        total, _ = LanguageModeling()(model, batch)
        ce = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    assert total > ce + 0.5  # the objective does add the router losses (weights 1.0)
    got = evaluate(model, LanguageModeling(), [batch], TrainConfig(precision="float32"), torch.device("cpu"))
    assert abs(got["loss"] - float(ce)) < 1e-5
    assert got["moe_aux_loss"] > 0  # every metric the objective reports comes back


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_compiled_moe_matches_eager(precision):
    """torch.compile traces _grouped_mm with a bf16-only shape function: float32 must take
    the padded-bmm path when compiling, and both must give eager's outputs and gradients."""
    import contextlib

    cfg = get_preset("nano").replace(n_experts=4, top_k=2, ffn_hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    grads = []
    for m in (model, torch.compile(model)):
        with ctx():
            out = m(ids).float()
        out.sum().backward()
        grads.append((out.detach(), model.layers[0].mlp.gate_proj.weight.grad.clone()))
        model.zero_grad()
    tol = 1e-5 if precision == "float32" else 2e-2
    assert max_diff(grads[0][0], grads[1][0]) <= tol
    assert max_diff(grads[0][1], grads[1][1]) <= tol * 10
