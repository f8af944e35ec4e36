"""report.html: built from a run directory's artifacts alone, self-contained (inline PNGs,
inline CSS, no scripts, no network), every present stage a section, absent ones named in
the footer, untrusted text escaped; `lmlab report`; a real tiny pipeline run; the
experiments' output directories; a headless Chromium screenshot (slow)."""
import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.report import build_report

EVIL = '<script>alert("x")</script> & <img src=x onerror=alert(1)> http://evil.example/'


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def write_metrics(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def marker(run: Path, stage: str, seconds: float) -> None:
    write_json(run / stage / "stage.json", {"stage": stage, "hash": f"h{stage}", "seconds": seconds,
                                            "finished": "2025-01-01T00:00:00"})


def make_fake_run(tmp_path: Path) -> Path:
    """A run directory shaped like lmlab.pipeline's: run.json, recipe.yaml, markers,
    pretrain/sft metrics, samples with HTML in them, eval, dpo, a reward model, ppo, a
    rejection stage; `rejection` has no marker (killed)."""
    run = tmp_path / "run"
    stages = ["tokenizer", "pretrain", "sample", "sft", "reward", "rejection", "ppo", "dpo", "eval"]
    write_json(run / "run.json", {"name": "fake", "stages": stages + ["export"]})
    (run / "recipe.yaml").write_text(f"name: fake\nsample:\n  prompts: ['{EVIL}']\n", encoding="utf-8")
    for i, s in enumerate(stages):
        if s != "rejection":
            marker(run, s, 1.5 + i)
    (run / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")
    write_metrics(run / "pretrain" / "metrics.jsonl",
                  [{"step": 0, "precision": "float32", "precision_reason": "asked for float32"}]
                  + [{"step": k, "loss": 5.0 - 0.1 * k, "lr": 1e-3, "grad_norm": 1.0 + k} for k in range(1, 21)]
                  + [{"step": 20, "val_loss": 3.5, "val_accuracy": 0.2}])
    with (run / "pretrain" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "loss": 3.')  # a line torn by kill -9
    (run / "pretrain" / "model").mkdir()
    (run / "sample" / "samples.txt").write_text(f"The {EVIL}\n\nThe second sample\n", encoding="utf-8")
    write_metrics(run / "sft" / "metrics.jsonl", [{"step": k, "loss": 2.0 / k, "accuracy": 0.1 * k}
                                                  for k in range(1, 6)])
    write_json(run / "sft" / "finetune_report.json", {"method": "lora", "trainable": 1234, "steps": 5,
                                                      "val_loss": 1.25, "answer_exact_match": 0.5})
    write_json(run / "reward" / "reward_report.json", {"method": "full", "steps": 10, "train": {"accuracy": 0.9},
                                                       "val": {"accuracy": 0.75, "loss": 0.5}})
    write_json(run / "rejection" / "rejection.json", {"n": 8, "kl_best_of_n": 1.2044, "gold_best_mean": 0.8,
                                                      "gold_sample_mean": 0.6})
    write_metrics(run / "rejection" / "samples.jsonl", [{"prompt": "sort 3 1 2", "answers": [
        {"text": "1 2 3", "reward": 0.9, "gold": 1.0, "best": True}, {"text": EVIL, "reward": 0.1, "best": False}]}])
    write_metrics(run / "ppo" / "metrics.jsonl", [{"step": k, "loss": 0.5, "reward": 0.1 * k, "gold": 0.6 + 0.02 * k,
                                                   "kl": 0.3 * k} for k in range(1, 9)])
    write_json(run / "ppo" / "rl_report.json", {
        "method": "ppo", "steps": 8, "seconds": 12.0, "reward": {"kind": "warm"},
        "before": {"gold_dense": 0.55, "gold_sparse": 0.1, "exact_match": 0.1},
        "after": {"gold_dense": 0.7, "gold_sparse": 0.3, "exact_match": 0.25, "kl_to_sft": 2.5}})
    write_metrics(run / "dpo" / "metrics.jsonl", [{"step": k, "loss": 0.69 - 0.01 * k, "margin": 0.1 * k}
                                                  for k in range(1, 6)])
    write_json(run / "dpo" / "dpo_report.json", {"method": "lora", "loss": "sigmoid", "steps": 5, "seconds": 3.0,
                                                 "val": {"accuracy": 0.8, "margin": 0.4}})
    write_json(run / "eval" / "world_eval.json", {
        "method": "lora", "steps": 5, "gold_reward_dense": 0.5, "gold_reward_sparse": 0.1,
        "examples": [{"prompt": "sort: 3 1 2", "answer": EVIL}, {"prompt": "sort: 2 1", "answer": "   "}]})
    return run


@pytest.fixture
def fake_run(tmp_path):
    return make_fake_run(tmp_path)


def body_text(page: str) -> str:
    """The page with its inline images removed (their base64 could hold anything)."""
    return re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', 'src=""', page)


def sections_of(page: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', page))


def decoded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def check_self_contained(page: str) -> None:
    text = body_text(page)
    # Any URL is inside escaped text, never in an attribute the browser would fetch.
    for m in re.finditer(r"https?://", text):
        before = text[max(0, m.start() - 200):m.start()]
        assert not re.search(r'(src|href)\s*=\s*"[^"]*$', before), text[m.start() - 80:m.start() + 40]
    assert not re.search(r"<script|<link|<iframe|@import|url\(", text, re.I)
    assert 'src="' not in text.replace('src=""', "")  # the only sources are the inline images
    for target in re.findall(r'href="([^"]+)"', text):
        assert target.startswith("#") or not re.match(r"^[a-z]+:|^/", target), target


def test_fake_run_report(fake_run):
    out = build_report(fake_run)
    assert out == fake_run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    check_self_contained(page)
    images = decoded_images(page)
    assert len(images) >= 5 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    found = sections_of(page)
    stages = {"tokenizer", "pretrain", "sample", "sft", "reward", "rejection", "ppo", "dpo", "eval"}
    assert {f"stage-{s}" for s in stages} <= found
    assert "stage-export" not in found  # listed but never started: a row in the table, no section
    assert {"overview", "losses", "rewards", "gold-kl", "policies", "samples"} <= found
    assert "proxy" not in found and "results" not in found
    assert "<h3>tokenizer.json</h3>" not in page  # a tokenizer's file, not a summary
    footer = page[page.index("<footer>"):]
    assert "Proxy-tuning" in footer and "Experiment results" in footer
    assert "1 malformed line(s) skipped" in footer  # the torn metrics line
    assert "could not be built" not in footer
    # Untrusted text: never markup, always its escaped form.
    assert "<script" not in page and "<img src=x" not in page
    assert html.escape(EVIL) in page
    assert page.count(html.escape(EVIL)) >= 4  # recipe, samples.txt, eval example, rejection sample
    # The killed stage is shown as incomplete; timings and the precision record are there.
    rejection = page[page.index('<section id="stage-rejection"'):]
    assert "incomplete" in rejection[:400]
    assert "asked for float32" in page and "not started" in page
    assert "(3 whitespace characters)" in page  # an answer of spaces is not an empty cell
    # Numbers from the summaries: PPO vs DPO, reward accuracy, gold vs KL.
    policies = page[page.index('<section id="policies"'):page.index('<section id="samples"')]
    assert "sft (before ppo)" in policies
    for value in ("0.5", "0.55", "0.7", "2.5", "0.8"):
        assert f"<td>{value}</td>" in policies, value
    rewards = page[page.index('<section id="rewards"'):page.index('<section id="gold-kl"')]
    assert "<td>0.9</td>" in rewards and "<td>0.75</td>" in rewards
    gold = page[page.index('<section id="gold-kl"'):page.index('<section id="policies"')]
    assert "<td>1.204</td>" in gold and "<td>0.76</td>" in gold  # best-of-8 KL; PPO's last gold
    # Relative links to each stage's artifacts.
    assert 'href="pretrain/metrics.jsonl"' in page and 'href="pretrain/model/"' in page
    assert 'href="dpo/dpo_report.json"' in page


def test_plots_are_not_blank(fake_run):
    from PIL import Image

    for png in decoded_images(build_report(fake_run).read_text(encoding="utf-8")):
        img = Image.open(io.BytesIO(png)).convert("L")
        lo, hi = img.getextrema()
        assert img.width >= 300 and hi - lo > 100  # something drawn on the white canvas


def test_absent_stages_have_no_section(tmp_path):
    run = tmp_path / "run"
    write_json(run / "run.json", {"name": "small", "stages": ["tokenizer", "pretrain"]})
    marker(run, "tokenizer", 0.1)
    page = build_report(run).read_text(encoding="utf-8")
    assert sections_of(page) == {"overview", "stage-tokenizer"}
    for title in ("Loss curves", "Reward models", "Gold reward vs KL", "PPO vs DPO", "Sample generations"):
        assert title in page[page.index("<footer>"):]


def test_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(LmlabError, match="not a directory"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="no run artifacts"):
        build_report(tmp_path / "empty")


def test_cli_report(fake_run, capsys):
    assert main(["report", str(fake_run)]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == fake_run / "report.html" and Path(printed).is_file()
    assert main(["report", str(fake_run / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_experiment_directory(tmp_path):
    """An experiment's output (experiments/warm.py and proxy_tuning.py shapes): results.json,
    results.md, its own PNG, loose training runs and a nested pipeline run."""
    out = tmp_path / "exp"
    acc = {name: {"train_noisy": a, "train_clean": a - 0.1, "id": a - 0.05, "ood": a - 0.2}
           for name, a in (("single_best", 0.7), ("ens2", 0.75), ("warm2", 0.8))}
    bon = {name: [{"n": n, "kl": kl, "gold": g + 0.05 * i, "proxy": g} for i, (n, kl) in enumerate(
        [(1, 0.0), (2, 0.193), (4, 0.636)])] for name, g in (("single", 0.5), ("warm2", 0.55))}
    results = [{"seed": s, "flip_rate": 0.25, "n_flipped": 10 + s, "accuracy": acc, "best_of_n": bon,
                "lrs": [1e-3]} for s in (0, 1)]
    write_json(out / "results.json", {"settings": {"members": 2}, "seeds": [0, 1], "results": results})
    write_json(out / "proxy.json", [{"seed": 0, "large": 0.2, "large-tuned": 0.6, "small-tuned": 0.5,
                                     "proxy": {"0.0": 0.2, "1.0": 0.5, "2.0": 0.45}, "gap_closed": 0.75}])
    (out / "results.md").write_text(f"# Title\n\n| a | b |\n|---|---|\n| **1** | {EVIL} |\n", encoding="utf-8")
    from lmlab.report.figures import line_plot

    (out / "plot.png").write_bytes(line_plot([("x", [0, 1], [0, 1], "o-")], "x", "y", "t"))
    write_metrics(out / "seed0" / "large-base" / "metrics.jsonl", [{"step": k, "loss": 3.0 / k} for k in (1, 2, 3)])
    write_json(out / "seed0" / "main" / "run.json", {"name": "main", "stages": []})
    page = build_report(out).read_text(encoding="utf-8")
    check_self_contained(page)
    assert "could not be built" not in page
    assert {"rewards", "gold-kl", "proxy", "losses", "results"} <= sections_of(page)
    rewards = page[page.index('<section id="rewards"'):]
    assert "mean over seeds 0, 1" in rewards and "<td>0.8</td>" in rewards and "<td>0.6</td>" in rewards
    assert "<strong>Gap closed: 75%</strong>" in page
    assert "seed0/large-base" in page and 'href="seed0/main/"' in page
    assert "<th><strong>1</strong></th>" not in page and "<td><strong>1</strong></td>" in page
    assert html.escape(EVIL) in page and "<script" not in page


def test_real_tiny_run(tmp_path):
    """A run made by lmlab.pipeline with the tiny recipe of the pipeline tests; the pipeline's
    report stage writes the page as the run's last stage."""
    from test_pipeline_recipe import TINY

    from lmlab.pipeline import load_recipe, run_pipeline

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"sort the list {i} then {i + 1} and {i * 7 % 11}: done." for i in range(200)))
    sets = [s for s in TINY if not s.startswith(("train=", "sft.train="))] + [
        "train={steps: 2, batch_size: 4, log_every: 1, progress: false, precision: float32}",
        "sft.train={steps: 2, batch_size: 4, progress: false, precision: float32}",
        f"data.source={corpus}", "stages=[tokenizer, shards, pretrain, sample, world, sft, eval, report]"]
    recipe, raw = load_recipe(None, sets)
    run_pipeline(recipe, tmp_path / "run", raw=raw, echo=lambda *_: None)
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    check_self_contained(page)
    assert "could not be built" not in page
    assert {"overview", "losses", "samples", *(f"stage-{s}" for s in
                                               ("tokenizer", "shards", "pretrain", "sample", "world", "sft", "eval"))
            } <= sections_of(page)
    assert "stage-report" not in sections_of(page)
    samples = (tmp_path / "run" / "sample" / "samples.txt").read_text(encoding="utf-8").split("\n\n")[0]
    assert html.escape(samples.strip("\n")) in page
    evaluated = json.loads((tmp_path / "run" / "eval" / "world_eval.json").read_text())
    assert html.escape(f"{evaluated['gold_reward_dense']:.4g}") in page
    # Regenerating from disk alone gives the same sections.
    assert sections_of(build_report(tmp_path / "run").read_text(encoding="utf-8")) == sections_of(page)


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
def test_chromium_screenshot(fake_run, tmp_path):
    """The page renders in a real browser at a phone's width and a desktop's: the
    screenshots are not blank."""
    from PIL import Image, ImageStat

    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium (install it: apt-get install -y chromium)")
    page = build_report(fake_run)
    for width, height in ((412, 2400), (1200, 1800)):
        shot = tmp_path / f"shot-{width}.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        img = Image.open(shot).convert("L")
        assert img.size == (width, height)
        assert ImageStat.Stat(img).var[0] > 200  # text, tables and plots, not a blank page


def test_unexpected_shapes_cost_a_section_not_the_page(fake_run):
    """Summaries of shapes the builders do not expect (a list where a mapping was, strings
    for numbers, a marker that is not JSON) still give a page."""
    write_json(fake_run / "ppo" / "rl_report.json", {"method": "ppo", "after": {"gold_dense": "high"},
                                                     "before": [1, 2], "reward": "warm"})
    write_json(fake_run / "reward" / "reward_report.json", ["not", "a", "mapping"])
    (fake_run / "dpo" / "stage.json").write_text("{torn", encoding="utf-8")
    write_metrics(fake_run / "sft" / "metrics.jsonl", [{"step": "one", "loss": 1.0}, [1, 2], {"step": 1, "loss": None}])
    page = build_report(fake_run).read_text(encoding="utf-8")
    assert {"overview", "stage-dpo", "stage-ppo", "stage-sft"} <= sections_of(page)
    assert "dpo/stage.json: torn or unreadable" in page
    assert "could not be built" not in page


def test_the_lifecycle_stages_own_report_shapes(tmp_path):
    """The reward, warm and proxy stages' reports as those stages write them (the warm
    stage's best single model carries string labels beside its accuracies; the proxy stage
    gives the gap closed per alpha): the claim sections read them."""
    run = tmp_path / "run"
    write_json(run / "run.json", {"name": "lifecycle", "stages": ["reward", "warm", "proxy"]})
    sets = {"train_clean": 0.6, "train_noisy": 0.55, "test_id": 0.58, "test_ood": 0.57}
    write_json(run / "reward" / "reward_report.json", {
        "method": "lora", "flip_rate": 0.25, "probe": {"model": "probe/model", "accuracy": sets},
        "members": [{"name": f"member-{k}", "seed": k, "lr": 1e-3, "accuracy": dict(sets, test_id=0.5 + k / 10)}
                    for k in range(2)]})
    write_json(run / "warm" / "warm_report.json", {"flip_rate": 0.25, "members": 2, "accuracy": {
        "best_single": {"chosen_by": "test_id", "member": "member-1", **sets}, "ens": sets,
        "warm": dict(sets, test_ood=0.61)}})
    write_json(run / "proxy" / "proxy_report.json", {
        "metric": "gold_reward_dense", "gap": 1.0, "gap_closed": {"0.5": 0.5, "1.0": 0.875, "1.5": 0.9},
        "proxy": {a: {"gold_reward_dense": v} for a, v in (("0.5", 0.0), ("1.0", 0.375), ("1.5", 0.4))},
        "scores": {"large_base": {"gold_reward_dense": -0.5}, "large_tuned": {"gold_reward_dense": 0.5},
                   "small_tuned": {"gold_reward_dense": 0.6}}})
    for s in ("reward", "warm", "proxy"):
        marker(run, s, 1.0)
    page = build_report(run).read_text()
    assert {"rewards", "proxy"} <= sections_of(page)
    text = body_text(page)
    assert "member-1" in text and "best_single" in text and "0.61" in text
    assert "Gap closed: 88%" in text  # alpha 1's, not the sweep's mean
