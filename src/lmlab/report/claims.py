"""The sections that show the papers' claims, found by what the summaries hold rather than
by which stage wrote them, so a pipeline run and an experiment's results.json feed the
same tables and plots:

- reward models' accuracy (clean, noisy, out of distribution) for single, ENS and WARM:
  `*reward*/*warm*/*ens*` reports with `...accuracy` values, and `accuracy: {reward name:
  {eval set: value}}` mappings (experiments/warm.py);
- gold reward against KL: best-of-N (`best_of_n: {reward: [{n, kl, gold}]}` curves and the
  rejection stage's `kl_best_of_n`/`gold_*_mean`) and over online RL training (metrics
  `kl` with `gold`, or `reward` when the reward is the gold one);
- PPO vs DPO: every policy's greedy gold reward, exact match and KL to the SFT policy;
- proxy-tuning: `gap_closed` with its alpha sweep (experiments/proxy_tuning.py).
"""
from __future__ import annotations

import re
from statistics import fmean
from typing import Any, Iterator

from lmlab.report import figures
from lmlab.report.artifacts import Run
from lmlab.report.html import esc, fmt, image, note, para, table
from lmlab.report.sections import Section
from lmlab.report.tables import flatten, is_number

# Keys that say which configuration a result belongs to (a seed is averaged over instead).
CONTEXT_KEYS = ("flip_rate", "label_noise", "noise", "method", "arm", "world", "members", "reward_kind")
EVAL_ORDER = ("train_noisy", "noisy", "memorised", "train_clean", "clean", "train", "val", "id", "test_id",
              "ood", "test_ood")
RL_METHODS = ("ppo", "grpo", "rloo")
REWARDISH = re.compile(r"reward|warm|ens|(^|[_-])rm([_-]|\d|$)")
MAX_DEPTH = 6


def walk(obj: Any, depth: int = 0) -> Iterator[dict]:
    """Every mapping inside a JSON value (bounded depth and breadth)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            if isinstance(v, (dict, list)):
                yield from walk(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj[:500]:
            if isinstance(v, (dict, list)):
                yield from walk(v, depth + 1)


def context(node: dict) -> tuple[tuple[str, Any], ...]:
    return tuple((k, node[k]) for k in CONTEXT_KEYS if k in node and not isinstance(node[k], (dict, list)))


def context_text(where: str, ctx: tuple) -> str:
    return where + "".join(f" · {k} {fmt(v)}" for k, v in ctx)


def _mean(values) -> float | None:
    xs = [v for v in values if is_number(v)]
    return fmean(xs) if xs else None


def _order(columns) -> list[str]:
    rank = {c: i for i, c in enumerate(EVAL_ORDER)}
    return sorted(columns, key=lambda c: (rank.get(c, len(rank)), c))


def _seeds_note(seeds: list) -> str:
    known = [s for s in seeds if s is not None]
    if len(known) > 1:
        return f"mean over seeds {', '.join(fmt(s) for s in known)}"
    return f"seed {fmt(known[0])}" if known else ""


# ----------------------------------------------------------------------- reward models
def _is_accuracy_row(v: Any) -> bool:
    """{eval set: accuracy}: numbers (or None), beside which a row may carry labels (strings,
    e.g. the warm stage's `chosen_by` and `member` of its best single model)."""
    return (isinstance(v, dict) and any(is_number(x) for x in v.values())
            and all(is_number(x) or x is None or isinstance(x, str) for x in v.values()))


def _is_accuracy_table(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(_is_accuracy_row(row) for row in v.values())


def _numbers(row: dict) -> dict:
    return {k: x for k, x in row.items() if is_number(x) or x is None}


def reward_models(run: Run) -> Section | None:
    parts = []
    # Reports of single reward-model trainings (and WARM/ENS stages): one row each.
    rows: dict[str, dict[str, float]] = {}
    info: dict[str, tuple] = {}
    for stage in run.stages:
        for fname, obj in run.summaries(stage).items():
            if not isinstance(obj, dict) or not (REWARDISH.search(fname) or REWARDISH.search(stage.name)):
                continue
            accs = {}
            for key, value in flatten(obj)[0]:
                if not is_number(value):
                    continue
                last = key.rsplit(".", 1)[-1]
                if last == "accuracy":
                    accs[key[: -len(".accuracy")] or "accuracy"] = value
                elif last.endswith("_accuracy") or last.startswith("accuracy_"):
                    accs[key] = value
            if accs:
                label = stage.name if len(run.summaries(stage)) == 1 else f"{stage.name}/{fname}"
                rows[label] = accs
                info[label] = (obj.get("method"), obj.get("steps"))
    if rows:
        columns = _order({c for r in rows.values() for c in r})
        parts.append(table(("reward model", "method", "steps", *columns),
                           [(n, *info[n], *(r.get(c) for c in columns)) for n, r in rows.items()],
                           caption="pairwise accuracy (chosen scored above rejected) per evaluation set"))
        if len(columns) * len(rows) > 1:
            parts.append(image(figures.grouped_bars(rows, columns, "reward model accuracy", "accuracy"),
                               "reward model accuracy"))
    # name -> {eval set: accuracy} mappings (single / ENS-M / WARM-M), grouped over seeds.
    groups: dict[tuple, list[tuple[Any, dict]]] = {}
    for where, obj in run.all_json():
        named: dict[str, dict] = {}  # models listed one per record: {"name": ..., "accuracy": {set: x}}
        for node in walk(obj):
            acc = node.get("accuracy")
            if _is_accuracy_table(acc):
                groups.setdefault((where, context(node)), []).append(
                    (node.get("seed"), {n: _numbers(row) for n, row in acc.items()}))
            elif _is_accuracy_row(acc) and isinstance(node.get("name"), str):
                named[node["name"]] = _numbers(acc)
        if len(named) > 1:
            groups.setdefault((where, ()), []).append((None, named))
    for (where, ctx), found in groups.items():
        names = list(dict.fromkeys(n for _, t in found for n in t))
        columns = _order({c for _, t in found for row in t.values() for c in row})
        means = {n: {c: _mean(t.get(n, {}).get(c) for _, t in found) for c in columns} for n in names}
        parts.append(f"<h3>{esc(context_text(where, ctx))}</h3>" + table(
            ("reward", *columns), [(n, *(means[n][c] for c in columns)) for n in names],
            caption=f"pairwise accuracy ({'; '.join(filter(None, [_seeds_note([s for s, _ in found]), 'ties count half']))})"))
        plotted = {n: {c: v for c, v in means[n].items() if v is not None} for n in names[:10]}
        parts.append(image(figures.grouped_bars(plotted, columns, context_text(where, ctx), "accuracy"),
                           f"accuracy per reward, {context_text(where, ctx)}"))
    if not parts:
        return None
    return Section("rewards", "Reward models: accuracy (clean, noisy, out of distribution)",
                   para("Single reward models, prediction ensembles (ENS: the mean of M models' scores) and "
                        "WARM (one model, the weight average of M) on each evaluation set: training pairs with "
                        "their noisy and their clean labels, held-out pairs in distribution (id) and out of "
                        "distribution (ood).") + "".join(parts))


# ---------------------------------------------------------------------- gold vs KL
def _gold_key(run: Run, stage, records: list[dict]) -> str | None:
    if any(is_number(r.get("gold")) for r in records):
        return "gold"
    for obj in run.summaries(stage).values():
        reward = obj.get("reward") if isinstance(obj, dict) else None
        if isinstance(reward, dict) and reward.get("kind") == "gold":
            return "reward"  # trained against the gold reward itself
    return None


def gold_vs_kl(run: Run) -> Section | None:
    parts = []
    series, rows = [], []
    style = iter(["o-", "s-", "^-", "d-", "v-", "x-"] * 4)
    for stage in run.stages:
        for fname, obj in run.summaries(stage).items():
            if isinstance(obj, dict) and is_number(obj.get("kl_best_of_n")) and is_number(obj.get("gold_best_mean")):
                start = obj.get("gold_sample_mean")
                xs, ys = ([0.0, obj["kl_best_of_n"]], [start, obj["gold_best_mean"]]) if is_number(start) else (
                    [obj["kl_best_of_n"]], [obj["gold_best_mean"]])
                series.append((f"{stage.name}: best-of-{fmt(obj.get('n'))}", xs, ys, "k*--"))
                rows.append((f"{stage.name} (best-of-{fmt(obj.get('n'))})", "analytic log n - (n-1)/n",
                             0.0, obj["kl_best_of_n"], start, obj["gold_best_mean"]))
        records = run.metrics(stage)
        if not any(is_number(r.get("kl")) for r in records):
            continue
        key = _gold_key(run, stage, records)
        if key is None:
            continue
        pts = [(r["kl"], r[key]) for r in records if is_number(r.get("kl")) and is_number(r.get(key))]
        if pts:
            series.append((f"{stage.name}: over training", [p[0] for p in pts], [p[1] for p in pts], next(style)))
            rows.append((stage.name, f"sampled rollouts ({key})", pts[0][0], pts[-1][0], pts[0][1], pts[-1][1]))
    if series:
        parts.append("<h3>This run</h3>" + image(figures.line_plot(
            series, "KL to the SFT policy (nats per answer)", "gold reward",
            "gold reward vs KL: best-of-N and online RL"), "gold reward against KL")
            + table(("policy", "measured on", "KL first", "KL last", "gold first", "gold last"), rows))
    # Best-of-n curves under several rewards (experiments/warm.py), grouped over seeds.
    groups: dict[tuple, list[tuple[Any, dict]]] = {}
    for where, obj in run.all_json():
        for node in walk(obj):
            bon = node.get("best_of_n")
            if isinstance(bon, dict) and bon and all(
                    isinstance(v, list) and v and all(isinstance(p, dict) and is_number(p.get("kl"))
                                                      and is_number(p.get("gold")) for p in v) for v in bon.values()):
                groups.setdefault((where, context(node)), []).append((node.get("seed"), bon))
    for (where, ctx), found in groups.items():
        names = list(dict.fromkeys(n for _, b in found for n in b))
        curves, table_rows = [], []
        ns = None
        for i, name in enumerate(names):
            per_seed = [b[name] for _, b in found if name in b]
            length = min(len(c) for c in per_seed)
            kl = [per_seed[0][j]["kl"] for j in range(length)]
            gold = [fmean(c[j]["gold"] for c in per_seed) for j in range(length)]
            ns = ns or [per_seed[0][j].get("n") for j in range(length)]
            curves.append((name, kl, gold, "k:" if "gold" in name or "oracle" in name else f"C{i % 10}o-"))
            table_rows.append((name, *gold))
        label = context_text(where, ctx)
        parts.append(f"<h3>Best-of-n: {esc(label)}</h3>" + image(figures.line_plot(
            curves, "KL(best-of-n ‖ policy) [nats]", "gold reward of the proxy's choice", label),
            f"best-of-n gold reward against KL, {label}")
            + table(("reward", *(f"n={fmt(n)}" for n in ns)), table_rows,
                    caption=f"expected gold reward of the answer each reward picks ({_seeds_note([s for s, _ in found])})"))
    if not parts:
        return None
    return Section("gold-kl", "Gold reward vs KL",
                   para("Optimising a proxy reward moves the policy away from the SFT policy (KL); the world's "
                        "gold reward shows whether the proxy's gains are real. Best-of-N's KL is analytic "
                        "(log n − (n−1)/n); online RL's is the sampled mean summed log-ratio per answer.")
                   + "".join(parts))


# ---------------------------------------------------------------------- PPO vs DPO
POLICY_COLUMNS = {
    "gold (dense)": ("gold_dense", "gold_reward_dense"),
    "gold (exact)": ("gold_sparse", "gold_reward_sparse"),
    "exact match": ("exact_match",),
    "KL to SFT": ("kl_to_sft",),
    "win rate vs SFT": ("win_rate_vs_sft", "win_rate"),
}


def _policy_values(node: dict) -> dict[str, float]:
    out = {}
    for col, aliases in POLICY_COLUMNS.items():
        for a in aliases:
            if is_number(node.get(a)):
                out[col] = node[a]
                break
    return out


def policies(run: Run) -> Section | None:
    rows: dict[str, dict[str, Any]] = {}
    names = {s.name for s in run.stages}

    def put(name: str, values: dict) -> None:
        if values:
            rows.setdefault(name, {}).update(values)

    aligned = []
    for stage in run.stages:
        for fname, obj in run.summaries(stage).items():
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get("after"), dict) and (obj.get("method") in RL_METHODS or stage.name in RL_METHODS):
                aligned.append(stage.name)
                if isinstance(obj.get("before"), dict):
                    # Measured on the RL stage's own held-out prompts: its comparable baseline.
                    put(f"sft (before {stage.name})", _policy_values(obj["before"]))
                put(stage.name, {**_policy_values(obj["after"]), "steps": obj.get("steps"),
                                 "seconds": obj.get("seconds")})
            elif fname.startswith("dpo") or stage.name == "dpo":
                aligned.append(stage.name)
                val = obj.get("val") if isinstance(obj.get("val"), dict) else {}
                put(stage.name, {**_policy_values(obj), "held-out preference accuracy": val.get("accuracy"),
                                 "implicit reward margin": val.get("margin"), "steps": obj.get("steps"),
                                 "seconds": obj.get("seconds")})
            elif stage.name == "eval" or "eval" in fname:
                # Per-policy scores keyed by stage name, or (world_eval.json) the SFT model's own.
                keyed = False
                for node in walk(obj):
                    for k, v in node.items():
                        if k in names and isinstance(v, dict) and _policy_values(v):
                            put(k, _policy_values(v))
                            keyed = True
                if not keyed:
                    put(str(obj.get("policy", "sft")), _policy_values(obj))
    if not aligned:
        return None
    columns = [c for c in (*POLICY_COLUMNS, "held-out preference accuracy", "implicit reward margin",
                           "steps", "seconds") if any(r.get(c) is not None for r in rows.values())]
    order = {n: i for i, n in enumerate(["sft", "rejection", *RL_METHODS, "dpo"])}
    ordered = sorted(rows, key=lambda n: (order.get(n.split(" ")[0], len(order)), n))
    body = table(("policy", *columns), [(n, *(rows[n].get(c) for c in columns)) for n in ordered],
                 caption="greedy answers to held-out prompts, scored by the world's gold reward")
    gold = {n: rows[n]["gold (dense)"] for n in ordered if is_number(rows[n].get("gold (dense)"))}
    if len(gold) >= 2:
        body += image(figures.grouped_bars({"gold (dense)": gold}, list(gold), "gold reward of each policy",
                                           "gold reward"), "gold reward per policy")
    has = [m for m in ("ppo", "dpo") if m in aligned]
    lead = ("PPO (online, against a reward) and DPO (offline, on preference pairs) from the same SFT policy."
            if len(has) == 2 else f"Only {', '.join(sorted(set(aligned)))} ran: the comparison needs both a ppo and "
            "a dpo stage.")
    return Section("policies", "PPO vs DPO", para(lead) + body)


# --------------------------------------------------------------------- proxy-tuning
def proxy_tuning(run: Run) -> Section | None:
    from lmlab.report.results import RESULTS_JSON, is_results

    found = []
    for where, obj in run.all_json():
        if where == RESULTS_JSON and is_results(obj):
            continue  # its rows repeat the experiment's own records, per alpha; it has its own section
        for node in walk(obj):
            if "gap_closed" in node and (is_number(node["gap_closed"]) or node["gap_closed"] is None):
                found.append((where, node))
            elif isinstance(node.get("gap_closed"), dict) and isinstance(node.get("scores"), dict):
                found.append((where, _proxy_stage_node(node)))
    if not found:
        return None
    scalars = []
    for _, node in found:
        scalars += [k for k, v in node.items() if is_number(v) and k not in scalars and k != "gap_closed"]
    scalars.sort(key=lambda k: k != "seed")
    columns = ["where", *scalars, "gap closed"]
    rows = [(w, *(n.get(k) for k in scalars), n.get("gap_closed")) for w, n in found]
    body = para("Proxy-tuning steers a large base at decoding time by the difference between a small tuned "
                "expert and its small base: logits = large + α·(expert − small). The fraction of the gap "
                "closed is (proxy − large base) / (large tuned − large base), at α = 1.")
    gaps = [n["gap_closed"] for _, n in found if is_number(n.get("gap_closed"))]
    if gaps:
        body += (f"<p><strong>Gap closed: {fmean(gaps):.0%}</strong> (mean of {len(gaps)}: "
                 f"{esc(', '.join(f'{g:.0%}' for g in gaps))})</p>")
    else:
        body += note("The gap is undefined here: the tuned large model is no better than its base.")
    body += table(columns, rows)
    series = []
    for i, (w, n) in enumerate(found):
        sweep = n.get("proxy")
        if isinstance(sweep, dict):
            pts = sorted((float(a), v) for a, v in sweep.items() if is_number(v) and _is_float(a))
            if pts:
                label = f"seed {fmt(n['seed'])}" if "seed" in n else w
                series.append((f"proxy, {label}", [p[0] for p in pts], [p[1] for p in pts], f"C{i % 10}o-"))
    if series:
        refs = [(f"{k} (mean)", _mean(n.get(k) for _, n in found), ls)
                for k, ls in (("large", ":"), ("large-tuned", "--")) if _mean(n.get(k) for _, n in found) is not None]
        body += image(figures.line_plot(series, "α (strength of the expert's steer)", "held-out score",
                                        "proxy-tuning: held-out score vs α", hlines=refs), "proxy-tuning sweep over α")
    return Section("proxy", "Proxy-tuning: the fraction of the gap closed", body)


def _proxy_stage_node(node: dict) -> dict:
    """The proxy stage's report (gap closed per alpha, every model's scores under `metric`)
    in the shape of an experiment's record: the gap closed at alpha 1 (the one nearest 1),
    the sweep and the reference models' scores."""
    metric = node.get("metric", "gold_reward_dense")
    gaps = {a: g for a, g in node["gap_closed"].items() if _is_float(a) and (is_number(g) or g is None)}
    nearest = min(gaps, key=lambda a: abs(float(a) - 1.0)) if gaps else None
    scores = node["scores"]

    def score(v):
        return v.get(metric) if isinstance(v, dict) else None

    sweep = node.get("proxy") if isinstance(node.get("proxy"), dict) else {}
    return {"alpha": float(nearest) if nearest is not None else None,
            "gap_closed": gaps.get(nearest) if nearest is not None else None,
            "large": score(scores.get("large_base")), "large-tuned": score(scores.get("large_tuned")),
            "small-tuned": score(scores.get("small_tuned")), "proxy": {a: score(v) for a, v in sweep.items()}}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def experiment_claim(run: Run) -> Section | None:
    """An experiment's experiment.json (lmlab.report.results): the paper's claim, our verdict,
    and mean ± std per arm, with the seed count; every seed is in results.md below."""
    from lmlab.report.results import RESULTS_JSON, is_results

    result = run.json(run.root / RESULTS_JSON)
    if not is_results(result):
        return None
    claim = result.get("claim") or {}
    metrics = [m for m in result.get("metrics", []) if isinstance(m, str)]
    rows = []
    for s in result["summary"]:
        cells = []
        for m in metrics:
            v = s.get(m) or {}
            cells.append("–" if not is_number(v.get("mean")) else
                         f"{fmt(v['mean'])} ± {fmt(v.get('std'), 2)}")
        rows.append([s.get("arm"), s.get("n"), *cells])
    machine = result.get("machine") or {}
    body = (para(f"<b>Claim</b> ({esc(claim.get('source', ''))}): {esc(claim.get('statement', ''))}"
                 + (f" Paper: {esc(claim['paper_figure'])}." if claim.get("paper_figure") else ""))
            + para(f"<b>Ours</b>: {esc(result.get('verdict', ''))}")
            + table(["arm", "seeds", *metrics], rows, caption="mean ± standard deviation over seeds")
            + note(f"Command: {esc(result.get('command', ''))} · machine: {esc(machine.get('cpu', 'unknown'))}, "
                   f"{esc(machine.get('torch_threads', '?'))} torch threads · written {esc(result.get('written', ''))}"))
    return Section("claim", f"Claim and verdict: {result.get('title', result.get('name', ''))}", body)
