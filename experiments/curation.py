"""The Phi-3 lesson at small scale, curation side: take clean documents, hold some out,
inject noise (exact/near duplicates, boilerplate, word-shuffled and random-character
documents) into the rest, curate, and report what each step removed per noise label.

    PYTHONPATH=src python experiments/curation.py --out runs/curation [--texts docs.jsonl]

Without --texts it uses the embedded corpus (`lmlab.data.corpus.embedded_corpus_texts`).
With --train-tokens N it then trains the default recipe's micro model on raw.jsonl and on
curated.jsonl for N tokens each (one tokenizer, trained on raw) and reports the loss of
both on the clean held-out text. Writes raw.jsonl, curated.jsonl, heldout.jsonl and report.json. With --learned-keep-top,
a quality classifier is trained on a clean "reference" split (good) vs the noisy training
pool (random web), as GPT-3 trained its filter on curated vs crawled text, and applied last.
It also writes the unified form, experiment.json and results.md (the claim, one row per
(raw or curated, seed), the verdict; `lmlab report OUT` shows them)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from pathlib import Path

from lmlab.config import load_yaml
from lmlab.data.curate import (LearnedFilterConfig, NoiseConfig, TrainConfig, curate, curate_config, inject_noise,
                               read_documents, train_classifier, write_documents)
from lmlab.data.curate.noise import removal_by_label
from lmlab.errors import LmlabError
from lmlab.io import write_json_atomic
from lmlab.report.results import Claim, command_line, paired, write_results

CLAIM = Claim(source="Abdin et al. 2024 (Phi-3)",
              statement="data quality over quantity: training on heavily filtered data beats training on more, "
                        "noisier data.",
              paper_figure="phi-3-mini (3.8B parameters, 3.3T tokens of heavily filtered web and synthetic data) "
                           "reaches 69% on MMLU, rivalling Mixtral 8x7B and GPT-3.5")


def load_texts(path: str | None) -> list[str]:
    if path:
        return [d["text"] for d in read_documents(path)]
    try:
        from lmlab.data.corpus import embedded_corpus_texts
    except ImportError:
        raise LmlabError("the embedded corpus (lmlab.data.corpus) is not in this checkout; pass --texts FILE") from None
    return list(embedded_corpus_texts())


def chunk(texts: list[str], min_chars: int) -> list[str]:
    """Cut long documents at blank lines into pieces of at least `min_chars` (the last piece
    of a document may be shorter), so that a corpus of a few long files gives many documents."""
    out = []
    for text in texts:
        piece: list[str] = []
        for para in re.split(r"\n\s*\n", text):
            piece.append(para)
            if sum(map(len, piece)) >= min_chars:
                out.append("\n\n".join(piece))
                piece = []
        if piece:
            out.append("\n\n".join(piece))
    return out


def heldout_loss(model, tok, texts: list[str], seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the held-out texts, packed into windows."""
    import torch

    ids = [i for t in texts for i in tok.encode(t, add_bos=True, add_eos=True)]
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise LmlabError("held-out text is shorter than one sequence; raise --heldout")
    x = torch.tensor(ids[: n * seq_len + 1])
    inputs, targets = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for s in range(0, n, batch_size):
            logits = model(inputs[s:s + batch_size])
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                             targets[s:s + batch_size].flatten(), reduction="sum"))
    return total / targets.numel()


def train_and_compare(out: Path, heldout: list[str], tokens: int, overrides: list[str]) -> dict:
    """Pretrain the same model on raw.jsonl and curated.jsonl for the same number of tokens,
    with one tokenizer (trained on the raw pool), and score both on the clean held-out text."""
    from lmlab.hub import load_model
    from lmlab.pipeline import load_recipe, run_pipeline
    from lmlab.tokenizer import train_tokenizer

    recipe, _ = load_recipe("quick", overrides)
    tok = train_tokenizer((d["text"] for d in read_documents(out / "raw.jsonl")), recipe.data.vocab_size)
    tok.save(out / "tokenizer.json")
    results = {}
    for name in ("raw", "curated"):
        recipe, raw = load_recipe("quick", [*overrides, f"name=curation-{name}", f"data.source={out / name}.jsonl",
                                         f"data.tokenizer={out / 'tokenizer.json'}", f"train.tokens={tokens}"])
        run_pipeline(recipe, out / f"run-{name}", raw=raw, stages=("tokenizer", "shards", "pretrain"))
        model = load_model(out / f"run-{name}" / "pretrain" / "model")
        results[name] = {"heldout_loss": round(heldout_loss(model, tok, heldout, recipe.data.seq_len), 4),
                         "train_tokens": tokens}
    return results


def unified_rows(result: dict, seed: int) -> list[dict]:
    training = result.get("training") or {}
    return [{"arm": name, "seed": seed, "documents": result["documents"][name], "chars": result["chars"][name],
             "heldout_loss": training.get(name, {}).get("heldout_loss"),
             "train_tokens": training.get(name, {}).get("train_tokens")} for name in ("raw", "curated")]


def verdict(result: dict, seed: int) -> str:
    """At equal training tokens, is the held-out loss lower after training on the curated
    documents than on the raw ones?"""
    clean = result["removal_by_noise_label"].get("clean")
    docs = result["documents"]
    kept_line = f"kept {docs['curated']} of {docs['raw']} documents" + (
        f", {clean['kept']} of the {clean['input']} clean ones" if clean else "")
    p = paired(unified_rows(result, seed), "heldout_loss", "raw", "curated")
    if not p["n"]:
        return f"not measured: curation only, {kept_line}; rerun with --train-tokens N to compare held-out loss"
    tokens = result["training"]["curated"]["train_tokens"]
    label = ("reproduced" if p["mean_b"] < p["mean_a"] else
             "not reproduced" if p["mean_b"] > p["mean_a"] else "level")
    return (f"{label}: held-out loss curated {p['mean_b']:.3f} vs raw {p['mean_a']:.3f} nats/token at "
            f"{tokens:,} training tokens each (seed {seed}, one seed); curation {kept_line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--texts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-chars", type=int, default=1500, help="cut documents into pieces this long (0: don't)")
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--reference", type=float, default=0.1)
    ap.add_argument("--config", help="curation YAML (docs/curation.md); default: every step with defaults")
    ap.add_argument("--learned-keep-top", type=float,
                    help="also apply the learned filter, keeping this best-scoring fraction")
    ap.add_argument("--train-tokens", type=int,
                    help="then pretrain the default recipe's model on raw and on curated for this many tokens each")
    ap.add_argument("--set", action="append", default=[], help="recipe override for training, e.g. train.lr=1e-3")
    args = ap.parse_args(argv)
    out = Path(args.out)
    texts = load_texts(args.texts)
    if args.chunk_chars:
        texts = chunk(texts, args.chunk_chars)
    random.Random(args.seed).shuffle(texts)
    n_held, n_ref = int(args.heldout * len(texts)), int(args.reference * len(texts))
    heldout, reference, pool = texts[:n_held], texts[n_held:n_held + n_ref], texts[n_held + n_ref:]
    raw = inject_noise(pool, NoiseConfig(seed=args.seed))
    write_documents(out / "heldout.jsonl", ({"id": f"held-{i}", "text": t} for i, t in enumerate(heldout)))
    write_documents(out / "raw.jsonl", raw)
    cfg = curate_config(load_yaml(args.config) if args.config else {})
    if args.learned_keep_top:
        clf = train_classifier(reference, [d["text"] for d in raw], TrainConfig(seed=args.seed))
        clf.save(out / "quality.safetensors")
        cfg = dataclasses.replace(cfg, learned=LearnedFilterConfig(model=str(out / "quality.safetensors"),
                                                                   keep_top_fraction=args.learned_keep_top))
    report = curate(lambda: read_documents(out / "raw.jsonl"), out / "curated.jsonl", cfg).to_dict()
    kept_ids = {d["id"] for d in read_documents(out / "curated.jsonl")}
    result = {"documents": {"clean_pool": len(pool), "raw": len(raw), "curated": len(kept_ids),
                            "heldout": len(heldout), "reference": len(reference)},
              "chars": {"raw": sum(len(d["text"]) for d in raw),
                        "curated": sum(len(d["text"]) for d in read_documents(out / "curated.jsonl"))},
              "removal_by_noise_label": removal_by_label(raw, kept_ids), "report": report}
    write_json_atomic(out / "report.json", result)
    print(json.dumps({k: result[k] for k in ("documents", "chars", "removal_by_noise_label")}, indent=1))
    print(json.dumps(report["removed"], indent=1))
    if args.train_tokens:
        result["training"] = train_and_compare(out, heldout, args.train_tokens, args.set)
        write_json_atomic(out / "report.json", result)
        print(json.dumps(result["training"], indent=1))
    ours = verdict(result, args.seed)
    table = ["| noise label | in | kept | removed |", "|---|---|---|---|"]
    table += [f"| {label} | {row['input']} | {row['kept']} | {row['removed_fraction']:.0%} |"
              for label, row in result["removal_by_noise_label"].items()]
    write_results(out, name="curation", title="Curation: raw vs curated training data", claim=CLAIM,
                  command=command_line(__file__, argv), metrics=["heldout_loss", "documents", "chars", "train_tokens"],
                  rows=unified_rows(result, args.seed), verdict=ours,
                  notes="Held-out loss is the mean next-token cross-entropy on the clean held-out documents "
                        "(lower is better), one tokenizer trained on the raw pool. What curation removed, per "
                        "injected noise label (report.json has every step):\n\n" + "\n".join(table),
                  extra={"removal_by_noise_label": result["removal_by_noise_label"]})
    print(ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
