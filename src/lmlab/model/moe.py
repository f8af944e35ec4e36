"""Sparse mixture-of-experts feed-forward block (Mixtral): a linear router picks the top-k
of E SwiGLU experts per token, weighted by the router's softmax renormalised over the
chosen k.

Dispatch is dropless and has no Python loop over experts: the (token, slot) pairs are
sorted by expert, each expert's rows form one contiguous group, and the three projections
run as grouped matmuls over all groups at once (`torch._grouped_mm`; a padded `bmm` where
that is unavailable). The outputs return to token order by the inverse permutation and
each token's k outputs are summed with its routing weights.

Each projection is a `GroupedLinear`: the experts' weights stacked as one (E, out, in)
`weight`, the layout of an `nn.Linear` per expert, so a checkpoint's per-expert matrices
stack and unstack without transposes and the state-dict keys (`mlp.gate_proj.weight`) read
like a dense MLP's. Adapters (`lmlab.adapters`) wrap these modules as they wrap nn.Linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The eager kernels take any float dtype (bf16 fast path, per-group mm otherwise), but
    # the shape function torch.compile traces with accepts bf16 only.
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    # The kernel needs 16-byte aligned rows (e.g. bf16 widths that are multiples of 8).
    return all((n * x.element_size()) % 16 == 0 for n in (x.shape[-1], w.shape[-1], w.shape[-2]))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an nn.Linear would compute in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` are grouped by expert (group e has counts[e] rows, in expert order);
    group e is multiplied by weight[e]^T. x: (M, in), weight: (E, out, in) -> (M, out).
    Under autocast both run in the autocast dtype, as an nn.Linear would (autocast does not
    cover the grouped kernel itself)."""
    dtype = compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    if _grouped_mm_usable(x, weight):
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
        if out.requires_grad:  # the CPU kernel's backward needs a dense incoming gradient
            out.register_hook(lambda g: g.contiguous())
        return out
    return _padded_bmm(x, weight, counts)


def _padded_bmm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The same product as one batched matmul over groups padded to the largest one."""
    n_experts = weight.shape[0]
    starts = counts.cumsum(0) - counts
    expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert]
    padded = x.new_zeros(n_experts, int(counts.max()) if x.shape[0] else 0, x.shape[1])
    padded[expert, slot] = x
    return torch.bmm(padded, weight.transpose(1, 2))[expert, slot]


class GroupedLinear(nn.Module):
    """E bias-free linear maps applied to expert-grouped rows: forward(x, counts) multiplies
    the counts[e] rows of group e by weight[e]^T."""

    def __init__(self, n_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, counts)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}"


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hidden, e = cfg.d_model, cfg.layer_ffn(layer), cfg.n_experts
        self.n_experts, self.top_k = e, cfg.top_k
        self.router = nn.Linear(d, e, bias=False)
        self.gate_proj = GroupedLinear(e, d, hidden)
        self.up_proj = GroupedLinear(e, d, hidden)
        self.down_proj = GroupedLinear(e, hidden, d)
        self.last_stats: dict[str, torch.Tensor] | None = None

    def inactive_parameters_per_token(self) -> int:
        per_expert = sum(p.weight.numel() for p in (self.gate_proj, self.up_proj, self.down_proj)) // self.n_experts
        return (self.n_experts - self.top_k) * per_expert

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), chosen experts (N, k) and their weights (N, k), float32."""
        logits = self.router(x)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, experts, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        logits, experts, weights = self.route(x)
        flat = experts.flatten()  # (N * k,): slot j of token t sits at t * k + j
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        # Cast before gathering: under autocast the k copies of each row move in 16 bits.
        rows = x.to(compute_dtype(x)).index_select(0, order // self.top_k)
        hidden = F.silu(self.gate_proj(rows, counts)) * self.up_proj(rows, counts)
        out = self.down_proj(hidden, counts)  # expert-sorted rows
        # Back to (token, slot) order by the inverse permutation, then every token's
        # routing-weighted sum over its k slots as one batched product. This replaces a
        # scatter-add (index_add_), whose forward and backward cost more on CPU.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slots = out.index_select(0, inverse).view(n, self.top_k, -1)
        y = torch.bmm(weights.to(slots.dtype).unsqueeze(1), slots).squeeze(1)
        self.last_stats = router_stats(logits, counts)
        return y.to(x.dtype).view(shape)


def router_stats(logits: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over this layer's tokens from which the auxiliary losses are formed, so that the
    losses over several layers equal those computed on all layers' tokens at once.
    counts[e]: routing slots given to expert e (the dispatch's bincount)."""
    return {
        "tokens": torch.tensor(float(logits.shape[0]), device=logits.device),
        "load": counts.float(),  # (E,)
        "prob": logits.float().softmax(-1).sum(0),  # (E,)
        "z": logits.float().logsumexp(-1).pow(2).sum(),
    }


def load_balancing_loss(stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: E * sum_e f_e * P_e, where f_e is the number of
    routing slots given to expert e per token (summed over the k slots) and P_e its mean
    router probability; it is smallest (top_k) when both are uniform. Equal to
    transformers' `load_balancing_loss_func`, whose per-slot fractions sum to f_e because
    P_e does not depend on the slot."""
    tokens = sum(s["tokens"] for s in stats)
    fraction = sum(s["load"] for s in stats) / tokens
    mean_prob = sum(s["prob"] for s in stats) / tokens
    return (fraction * mean_prob).sum() * fraction.shape[-1]


def router_z_loss(stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-sum-exp of the router logits (keeps them small)."""
    return sum(s["z"] for s in stats) / sum(s["tokens"] for s in stats)


def collect_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The auxiliary losses and expert-load statistics of the last forward; {} for a dense model."""
    stats = [m.last_stats for m in model.modules() if isinstance(m, MoE) and m.last_stats is not None]
    if not stats:
        return {}
    load = sum(s["load"] for s in stats)
    share = load / load.sum()
    return {
        "moe_aux_loss": load_balancing_loss(stats),
        "moe_z_loss": router_z_loss(stats),
        # max/mean expert load: 1.0 is perfectly balanced
        "moe_load_imbalance": share.max() * share.numel(),
    }
