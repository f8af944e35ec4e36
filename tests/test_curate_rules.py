"""Each cleaning and quality rule removes a hand-made bad document and keeps a good one."""
import pytest

from lmlab.data.curate import CleanConfig, QualityConfig, StepReport, clean_documents, quality_rule
from lmlab.data.curate.clean import document_rule
from lmlab.data.curate.quality import duplicate_ngram_char_fraction, top_ngram_char_fraction

GOOD = ("The river runs through the middle of the old town, and the bridge that crosses it was built "
        "with stone from the hills to the north. Farmers bring their goods to the market on the square "
        "every week, and travellers stop to rest at the inn beside the water.")
LINES = ["The mill by the river was the first building in the valley and it still stands.",
         "Its wheel turned for two hundred years before the flood of the great winter.",
         "Children from the school visit it each spring to learn how flour was made.",
         "A small museum now keeps the tools of the millers and their account books."]

BAD = {
    "too_few_words": "The cat sat on the mat with the dog.",
    "mean_word_length_low": "a b c d e f g h i j k l m n o p q r s t u v w x y z the and of to",
    "mean_word_length_high": " ".join(["internationalisation", "the", "and", "counterrevolutionaries"] * 8),
    "symbol_to_word_ratio": GOOD + " #news #town #river #bridge #market #farm #inn #water",
    "bullet_lines": "\n".join("- " + ln for ln in LINES),
    "ellipsis_lines": "\n".join(ln[:-1] + "..." for ln in LINES[:2]) + "\n" + "\n".join(LINES[2:]),
    "alpha_words": GOOD + " " + " ".join(str(1000 + i) for i in range(15)),
    "stop_words": ("River runs through middle old town, bridge crossing it built from stone hills north. "
                   "Farmers bring goods market square every week, travellers rest inn beside water."),
    "duplicate_lines": "\n".join(LINES + LINES[:2]),
    "top_2gram": GOOD + " " + " ".join(["old town"] * 12),
    "duplicate_5grams": GOOD + " " + " ".join(GOOD.split()[:12]),
    "blocklist": GOOD + " Lorem ipsum dolor sit amet.",
    "duplicate_line_chars": "\n".join([GOOD, GOOD] + [ln.split(" and ")[0] for ln in LINES] + ["Fish swim.", "Birds sing."]),
}


@pytest.mark.parametrize("rule,overrides,text", [
    ("too_many_words", {"max_words": 30}, GOOD),
    ("curly_brace", {"reject_curly_brace": True}, GOOD + " {x}"),
])
def test_optional_rules(rule, overrides, text):
    import dataclasses

    assert quality_rule(text, QualityConfig()) is None
    assert quality_rule(text, dataclasses.replace(QualityConfig(), **overrides)) == rule


def test_good_documents_pass_every_rule():
    assert quality_rule(GOOD, QualityConfig()) is None
    assert quality_rule("\n".join(LINES), QualityConfig()) is None


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_heuristic_rule_removes_its_bad_document(rule):
    assert quality_rule(BAD[rule], QualityConfig()) == rule


@pytest.mark.parametrize("rule,field", [("too_few_words", "min_words"), ("stop_words", "min_stop_words"),
                                        ("blocklist", "blocklist"), ("bullet_lines", "max_bullet_line_fraction")])
def test_rules_switch_off(rule, field):
    import dataclasses

    assert quality_rule(BAD[rule], dataclasses.replace(QualityConfig(), **{field: None})) != rule


def test_ngram_fractions_by_hand():
    ws = "a b a b c".split()                 # word chars 5; "a b" twice -> 2*2/5
    assert top_ngram_char_fraction(ws, 2) == pytest.approx(4 / 5)
    ws = "x y z w x y z q".split()           # 3-gram "x y z" twice covers 6 of 8 chars
    assert duplicate_ngram_char_fraction(ws, 3) == pytest.approx(6 / 8)
    assert duplicate_ngram_char_fraction("p q r s".split(), 2) == 0.0


def run_clean(texts, **kw):
    step = StepReport("clean")
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    out = list(clean_documents(docs, CleanConfig(**kw), step))
    step.check()
    return out, step


def test_edits_normalise_unicode_control_chars_and_whitespace():
    text = "Caf\u0065\u0301 \ufb01ne\u200b  text\x07 with\t\ttabs   \n\n\n\nand ＡＢＣ paragraphs here"
    (nfc,), step = run_clean([text], boilerplate_min_docs=None)
    assert nfc["text"] == "Caf\u00e9 \ufb01ne text with tabs\n\nand ＡＢＣ paragraphs here"
    assert step.edits == {"unicode_normalized": 1, "control_chars_stripped": 1, "whitespace_fixed": 1}
    (nfkc,), _ = run_clean([text], boilerplate_min_docs=None, unicode_form="NFKC")
    assert nfkc["text"] == "Caf\u00e9 fine text with tabs\n\nand ABC paragraphs here"
    (raw,), step = run_clean([text], boilerplate_min_docs=None, unicode_form=None, strip_control=False,
                             fix_whitespace=False)
    assert raw["text"] == text and not step.edits
    (code,), _ = run_clean(["def f(x):\n    return  x   \n\n\n\n\tpass"], boilerplate_min_docs=None, min_chars=None)
    assert code["text"] == "def f(x):\n    return x\n\n\tpass"  # indentation is syntax


def test_boilerplate_lines_repeated_across_documents_are_removed():
    banner = "Accept all cookies to continue browsing."
    texts = [f"{banner}\n{ln} Number {i}." for i, ln in enumerate(LINES * 2)] + [LINES[0]]
    out, step = run_clean(texts, boilerplate_min_docs=5, boilerplate_min_fraction=0.0)
    assert all(banner not in d["text"] for d in out) and len(out) == len(texts)
    assert step.edits["boilerplate_lines"] == 8
    out, _ = run_clean(texts, boilerplate_min_docs=9, boilerplate_min_fraction=0.0)  # seen in only 8
    assert sum(banner in d["text"] for d in out) == 8


@pytest.mark.parametrize("text,rule", [
    ("", "empty"),
    ("short one", "too_short"),
    ("x" * 200, "too_long"),
    ("The caf\ufffd\ufffd served cr\ufffdpes and tea every morning of the week.", "bad_charset"),
    ("CafÃ© served crÃ¨me and tea every morning of the week.", "bad_charset"),
    ("Москва — столица России, крупнейший город страны.", "non_latin_script"),
])
def test_document_rules(text, rule):
    cfg = CleanConfig(max_chars=150)
    assert document_rule(text, cfg) == rule
    assert document_rule(GOOD[:140], cfg) is None
