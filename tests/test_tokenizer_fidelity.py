"""BOS/EOS exactly as a checkpoint's own tokenizer adds them (transformers is the oracle),
in the library and in `lmlab generate`; chat templates found where transformers keeps them."""
import json

import pytest

from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["hello", "world", "the", "a", "cat", "sat"]


def write_tokenizer(directory, style):
    """A tiny word-level tokenizer.json in the style of a real checkpoint:
    "none": no post-processor, no add_bos_token (SmolLM2, GPT-2: no BOS is added);
    "template": a post-processor that prepends BOS (Llama 3 base);
    "config_off": a BOS-adding post-processor but tokenizer_config.json says add_bos_token false."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + ["[UNK]"])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    if style in ("template", "config_off"):
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if style == "config_off":
        config["add_bos_token"] = False
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("style, adds_bos", [("none", False), ("template", True), ("config_off", False)])
def test_special_tokens_follow_the_checkpoint(tmp_path, style, adds_bos):
    d = write_tokenizer(tmp_path / style, style)
    ours = Tokenizer.load(d)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                                  **json.loads((d / "tokenizer_config.json").read_text()))
    text = "hello the cat sat"
    assert ours.add_bos is adds_bos
    if style != "config_off":  # transformers' fast tokenizer keeps its post-processor there
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert (ours.encode(text, add_special_tokens=True)[0] == ours.bos_id) is adds_bos


def test_lmlab_trained_tokenizers_still_add_bos():
    from lmlab.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tok = train_tokenizer(["a b c"] * 5, vocab_size=len(SPECIAL_TOKENS) + 256 + 4)
    assert tok.add_bos and tok.encode("a", add_special_tokens=True)[0] == tok.bos_id


@pytest.mark.parametrize("style", ["none", "template"])
def test_cli_generate_prompts_as_the_library_does(tmp_path, style, capsys):
    from lmlab.checkpoint import save_model
    from lmlab.cli import main
    from lmlab.config import ModelConfig
    from lmlab.decode.generate import generate
    from lmlab.model import build_model

    d = write_tokenizer(tmp_path / "m", style)
    tok = Tokenizer.load(d)
    model = build_model(ModelConfig(name="t", vocab_size=16, d_model=32, n_layers=1, n_heads=4, ffn_hidden=64,
                                    max_seq_len=32))
    save_model(model, d)
    prompt = "hello the cat"
    ids = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))(prompt)["input_ids"]
    (expected,) = generate(model.eval(), [ids], 6)
    assert main(["generate", str(d), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt + tok.decode([t for t in expected.tokens if t != tok.eos_id]))


def test_chat_template_is_found_in_chat_template_jinja(tmp_path):
    from lmlab.data.chat import JinjaTemplate, find_chat_template

    d = write_tokenizer(tmp_path / "m", "none")
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (d / "chat_template.jinja").write_text(jinja)
    assert find_chat_template(d) == jinja
    template = JinjaTemplate.from_tokenizer_config(d, Tokenizer.load(d))
    assert template.render([{"role": "user", "content": "hi"}]) == "user: hi\n"
    # tokenizer_config.json's chat_template still works, and the .jinja file wins (as in transformers)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "IGNORED"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template(d) == jinja
    (d / "chat_template.jinja").unlink()
    assert find_chat_template(d / "tokenizer_config.json") == "IGNORED"
