"""The unified experiment result form (lmlab.report.results) and its report section."""
import json
import math

import pytest

from lmlab.errors import LmlabError
from lmlab.report import build_report
from lmlab.report.results import Claim, RESULTS_JSON, RESULTS_MD, summarise, write_results

CLAIM = Claim(source="Somebody et al. 2024", statement="A beats B.", paper_figure="79.4% win rate")


def rows():
    return [{"arm": "A", "seed": 0, "gold": 0.5, "kl": 1.0},
            {"arm": "A", "seed": 1, "gold": 0.7, "kl": 3.0},
            {"arm": "B", "seed": 0, "gold": 0.2, "kl": None},
            {"arm": "B", "seed": 1, "gold": 0.4}]


def test_summary_is_mean_and_sample_std_per_arm_in_first_seen_order():
    s = summarise(rows(), ["gold", "kl"])
    assert [e["arm"] for e in s] == ["A", "B"]
    assert s[0]["n"] == 2 and s[0]["gold"]["mean"] == pytest.approx(0.6)
    assert s[0]["gold"]["std"] == pytest.approx(math.sqrt(0.02))  # (0.1^2 + 0.1^2) / (2 - 1)
    assert s[0]["kl"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0))}
    assert s[1]["kl"] == {"mean": None, "std": None}  # no seed has it
    assert summarise([{"arm": "C", "seed": 0, "gold": 1.5}], ["gold"])[0]["gold"] == {"mean": 1.5, "std": 0.0}


def test_write_results_writes_json_and_markdown_with_every_seed(tmp_path):
    out = tmp_path / "exp"
    result = write_results(out, name="toy", title="Toy claim", claim=CLAIM, command="python x.py --seeds 0 1",
                           metrics=["gold", "kl"], rows=rows(), verdict="reproduced: A 0.60 vs B 0.30",
                           notes="ties count half")
    on_disk = json.loads((out / RESULTS_JSON).read_text())
    assert on_disk["schema"] == "lmlab.experiment/1" and on_disk == json.loads(json.dumps(result))
    assert on_disk["machine"]["cpu"] and on_disk["machine"]["torch"]
    md = (out / RESULTS_MD).read_text()
    assert "79.4% win rate" in md and "reproduced: A 0.60 vs B 0.30" in md
    assert "| A | 2 | 0.6 ± 0.14 | 2 ± 1.4 |" in md
    assert "| B | 1 | 0.4 | – |" in md  # every seed, a missing metric shown as a dash


@pytest.mark.parametrize("bad, words", [
    ([], "no result rows"),
    ([{"arm": "A", "gold": 1.0}], "lacks seed"),
    ([{"arm": "A", "seed": 0, "gold": float("nan")}], "non-finite gold"),
    ([{"arm": "A", "seed": 0, "gold": "high"}], "non-numeric"),
])
def test_bad_rows_are_refused_and_nothing_is_written(tmp_path, bad, words):
    with pytest.raises(LmlabError, match=words):
        write_results(tmp_path / "exp", name="toy", title="t", claim=CLAIM, command="c", metrics=["gold"],
                      rows=bad, verdict="v")
    assert not (tmp_path / "exp").exists()


def test_missing_figure_is_refused(tmp_path):
    with pytest.raises(LmlabError, match="not files"):
        write_results(tmp_path, name="toy", title="t", claim=CLAIM, command="c", metrics=["gold"],
                      rows=rows(), verdict="v", figures=["curve.png"])


def test_report_shows_the_claim_verdict_and_summary(tmp_path):
    write_results(tmp_path, name="toy", title="Toy claim", claim=CLAIM, command="python x.py",
                  metrics=["gold", "kl"], rows=rows(), verdict="refuted here: B wins")
    html = build_report(tmp_path).read_text()
    assert "Claim and verdict: Toy claim" in html and "refuted here: B wins" in html
    assert "A beats B." in html and "0.6 ± 0.14" in html
    assert html.count("lmlab.experiment/1") == 0  # the JSON is shown as the section, not dumped again


def test_paired_compares_seed_by_seed_over_the_seeds_both_arms_have():
    from lmlab.report.results import paired

    rs = [{"arm": "dense", "seed": 0, "loss": 5.0}, {"arm": "moe", "seed": 0, "loss": 5.5},
          {"arm": "dense", "seed": 1, "loss": 4.0}, {"arm": "moe", "seed": 1, "loss": 3.5},
          {"arm": "dense", "seed": 2, "loss": 6.0}, {"arm": "moe", "seed": 2, "loss": 7.0},
          {"arm": "dense", "seed": 3, "loss": 1.0}]  # seed 3 has no MoE row: left out
    p = paired(rs, "loss", "dense", "moe")
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3
    assert p["mean_a"] == pytest.approx(5.0) and p["mean_b"] == pytest.approx(16 / 3)
    assert p["diffs"] == pytest.approx([0.5, -0.5, 1.0]) and p["mean_diff"] == pytest.approx(1 / 3)
    # differences 0.5, -0.5, 1.0: sample variance ((1/6)^2 + (5/6)^2 + (2/3)^2) / 2 = 7/12
    assert p["stderr"] == pytest.approx(math.sqrt(7 / 12) / math.sqrt(3))
    assert (p["b_above"], p["b_below"], p["level"]) == (2, 1, 0)
    one = paired(rs[:2], "loss", "dense", "moe")
    assert one["n"] == 1 and one["stderr"] is None
    assert paired(rs, "loss", "dense", "nope")["mean_a"] is None


def test_command_line_is_rebuilt_from_the_arguments(tmp_path, monkeypatch):
    from lmlab.report.results import command_line

    (tmp_path / "experiments").mkdir()
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "experiments" / "x.py"
    assert command_line(script, ["--out", "runs/a b", "--seeds", "0", "1"]) == \
        "python experiments/x.py --out 'runs/a b' --seeds 0 1"
    monkeypatch.setattr("sys.argv", ["x.py", "moe"])
    assert command_line(script) == "python experiments/x.py moe"
    assert command_line("/elsewhere/y.py", []) == "python /elsewhere/y.py"


def test_unified_rows_do_not_enter_the_proxy_tuning_section_twice(tmp_path):
    """experiment.json's rows carry a gap_closed per alpha; the proxy-tuning section reads the
    experiment's own per-seed records (results.json) only, so its mean stays theirs."""
    (tmp_path / "results.json").write_text(json.dumps([{"seed": 0, "large": 0.1, "large-tuned": 0.3,
                                                        "proxy": {"1.0": 0.2}, "gap_closed": 0.5}]))
    write_results(tmp_path, name="proxy", title="Proxy", claim=CLAIM, command="c", metrics=["exact_match", "gap_closed"],
                  rows=[{"arm": "proxy α=1", "seed": 0, "exact_match": 0.2, "gap_closed": 0.5},
                        {"arm": "proxy α=2", "seed": 0, "exact_match": 0.3, "gap_closed": 1.0}], verdict="v")
    html = build_report(tmp_path).read_text()
    assert "Gap closed: 50%</strong> (mean of 1: 50%)" in html
