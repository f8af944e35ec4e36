"""training_flops_per_token against hand-counted weights of the nano preset."""
from dataclasses import replace

from lmlab.config import get_preset
from lmlab.summary import training_flops_per_token


def test_dense_flops_by_hand():
    cfg = get_preset("nano")  # V=512, d=64, 2 layers, 4 heads of 16, 2 KV heads, FFN 172
    attn = 64 * 64 + 2 * (64 * 32) + 64 * 64
    layer = attn + 3 * 64 * 172 + 2 * 64  # + two RMSNorm weights
    matmul = 2 * layer + 64 + 512 * 64  # + final norm + output head; the embedding is a lookup
    attention = 2 * 12 * 128 * (4 * 16)
    assert training_flops_per_token(cfg, 128) == 6 * matmul + attention == 938_880


def test_tied_head_still_counts_as_a_matmul():
    cfg = get_preset("nano")
    assert training_flops_per_token(replace(cfg, tie_embeddings=True), 128) == training_flops_per_token(cfg, 128)


def test_moe_counts_active_experts_and_router_only():
    dense = get_preset("nano")
    moe = replace(dense, ffn_hidden=86, n_experts=4, top_k=2)  # 2 active experts of 86 = 172
    router = 2 * 64 * 4
    assert training_flops_per_token(moe, 128) == training_flops_per_token(dense, 128) + 6 * router
