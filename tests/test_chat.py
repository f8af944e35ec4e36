"""Chat data: validation errors name the record, loss masks cover exactly the answers,
packing does not leak across conversations, the SFT loss matches a hand-built one."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.data.chat import (
    IGNORE_INDEX, PAD_DOC, Conversation, JinjaTemplate, RoleTokenTemplate, encode_conversations, one_per_row,
    pack_examples, read_chat_jsonl,
)
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.data.chat import with_document_masks
from lmlab.train.objectives.lm import LanguageModeling

from chartok import CharTokenizer

TOK = CharTokenizer()


def conv(*pairs, source="t:1"):
    return Conversation(tuple({"role": r, "content": c} for r, c in pairs), source)


def test_our_template_masks_everything_but_answers_and_their_end():
    template = RoleTokenTemplate(TOK)
    ex = template.encode(conv(("system", "be brief"), ("user", "hi"), ("assistant", "yo"),
                              ("user", "again"), ("assistant", "ok")))
    assert TOK.decode(ex.ids) == ("<|bos|><|system|>be brief<|end|><|user|>hi<|end|>"
                                  "<|assistant|>yo<|end|><|user|>again<|end|><|assistant|>ok<|end|>")
    trained = TOK.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained == "yo<|end|>ok<|end|>"
    # Every trained label sits exactly on the same id (labels are aligned with ids).
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ex.ids, ex.labels))
    assert TOK.decode(template.encode_prompt([{"role": "user", "content": "hi"}])) == \
        "<|bos|><|user|>hi<|end|><|assistant|>"


def test_prompt_response_records_and_errors_name_the_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = [{"prompt": "p", "response": "r", "system": "s"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    convs = read_chat_jsonl(path)
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant"]
    assert convs[1].source == f"{path}:2"

    bad = {
        "missing role": ({"messages": [{"content": "x"}, {"role": "assistant", "content": "a"}]}, "no 'role'"),
        "unknown role": ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
        "empty answer": ({"prompt": "p", "response": "  "}, "empty assistant answer"),
        "no answer": ({"messages": [{"role": "user", "content": "u"}]}, "no assistant message"),
        "wrong shape": ({"text": "x"}, "needs 'messages'"),
    }
    for _, (record, message) in bad.items():
        path.write_text(json.dumps(good[0]) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(LmlabError, match=f"chat.jsonl:2.*{message}"):
            read_chat_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(LmlabError, match="chat.jsonl:1: malformed JSON"):
        read_chat_jsonl(path)


def test_too_long_conversation_names_the_record():
    long = conv(("user", "x" * 40), ("assistant", "y"), source="data.jsonl:7")
    with pytest.raises(LmlabError, match="data.jsonl:7.*longer than the context of 16"):
        encode_conversations([long], RoleTokenTemplate(TOK), max_len=16)


ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def test_stored_jinja_template_renders_like_transformers_and_masks_answers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": ZEPHYR, "eos_token": "</s>"}))
    template = JinjaTemplate.from_tokenizer_config(tmp_path, TOK)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        eos_token="</s>", chat_template=ZEPHYR)
    expected = hf.apply_chat_template(messages, tokenize=False)
    assert template.render(messages) == expected
    assert template.render(messages[:2], add_generation_prompt=True) == \
        hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    ex = template.encode(Conversation(tuple(messages)))
    assert TOK.decode(ex.ids) == expected
    assert TOK.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "a1</s>a2</s>"


def test_packing_isolates_conversations():
    cfg = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    model = build_model(cfg).eval()
    template = RoleTokenTemplate(TOK)
    first = template.encode(conv(("user", "abc"), ("assistant", "defgh")))
    second = template.encode(conv(("user", "xy"), ("assistant", "zw"), ("user", "q"), ("assistant", "r")))
    packed = pack_examples([first, second], seq_len=48, pad_id=TOK.pad_id)
    alone = pack_examples([second], seq_len=48, pad_id=TOK.pad_id)
    assert packed["input_ids"].shape == (1, 48)
    n1, n2 = len(first.ids) - 1, len(second.ids) - 1
    assert packed["doc_ids"][0, :n1].eq(0).all() and packed["doc_ids"][0, n1:n1 + n2].eq(1).all()
    def packed_logits(rows):
        b = with_document_masks(rows)
        return model(b["input_ids"], positions=b["positions"], attn_mask=b["attn_mask"])

    with torch.no_grad():
        in_pack = packed_logits(packed)[0, n1:n1 + n2]
        by_itself = packed_logits(alone)[0, :n2]
        plain = model(torch.tensor([second.ids[:-1]]))[0]
    torch.testing.assert_close(in_pack, by_itself, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_itself, plain, atol=1e-5, rtol=1e-5)
    # Without the document mask the first conversation would leak into the second.
    with torch.no_grad():
        leaky = model(packed["input_ids"])[0, n1:n1 + n2]
    assert (leaky - by_itself).abs().max() > 1e-3
    # A full row starts a new one.
    rows = pack_examples([first, second, first], seq_len=n1 + n2, pad_id=TOK.pad_id)
    assert rows["input_ids"].shape[0] == 2 and rows["doc_ids"][1, n1:].eq(PAD_DOC).all()


def test_sft_loss_is_cross_entropy_on_answer_tokens_only():
    cfg = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=4,
                      ffn_hidden=48, max_seq_len=64)
    model = build_model(cfg)
    template = RoleTokenTemplate(TOK)
    examples = [template.encode(conv(("user", "hello"), ("assistant", "world"))),
                template.encode(conv(("user", "a"), ("assistant", "bc")))]
    batch = with_document_masks(one_per_row(examples, seq_len=20, pad_id=TOK.pad_id))
    objective = LanguageModeling(accuracy=True)
    loss, metrics = objective(model, batch)
    # Hand-built reference: each conversation alone, unpadded; CE at answer positions.
    total, count = 0.0, 0
    for ex in examples:
        logits = model(torch.tensor([ex.ids[:-1]]))[0]
        for pos, label in enumerate(ex.labels[1:]):
            if label != IGNORE_INDEX:
                total += F.cross_entropy(logits[pos], torch.tensor(label)).item()
                count += 1
    assert objective.weight(batch) == count == len("world") + 1 + len("bc") + 1
    assert objective.tokens(batch) == sum(len(ex.ids) - 1 for ex in examples)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_answer_exact_match_by_hand():
    from lmlab.eval.answers import answer_exact_match

    # One row, two conversations (doc 0: answer at positions 1-2, doc 1: answer at 4), padding.
    targets = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 5, IGNORE_INDEX]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, PAD_DOC]])
    predicted = torch.tensor([[9, 3, 4, 9, 6, 9]])  # doc 0 right (prompt positions ignored), doc 1 wrong
    logits = F.one_hot(predicted, 10).float()
    assert answer_exact_match(logits, targets, doc_ids).tolist() == [1.0, 0.0]


def test_our_template_with_a_trained_lmlab_tokenizer():
    from lmlab.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tok = train_tokenizer(["sort: c a b", "a b c", "hello there"] * 5, vocab_size=len(SPECIAL_TOKENS) + 256 + 8)
    template = RoleTokenTemplate(tok)
    ex = template.encode(conv(("user", "sort: c a b"), ("assistant", "a b c")))
    assert tok.decode(ex.ids) == "<|bos|><|user|>sort: c a b<|end|><|assistant|>a b c<|end|>"
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "a b c<|end|>"
    assert template.stop_ids == [tok.token_to_id("<|end|>")]
