from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_kaja.tiny import LLMJP_SPECIAL_TOKENS, build_tiny_tokenizer


def test_tokenizer_has_llmjp_special_ids_and_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for i, name in enumerate(LLMJP_SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(name) == i
    assert tok("こんにちは")["input_ids"][0] == 1  # BOS added by default, like llm-jp's
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "日本の首都は?"},
            {"role": "assistant", "content": "東京です。"},
        ],
        tokenize=False,
    )
    assert text == "<s>\n\n### 指示:\n日本の首都は?\n\n### 応答:\n東京です。</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 1 and ids[-1] == 2
    assert tok.unk_token_id not in ids


def test_tiny_model_loads_with_transformers(tiny_hf_gqa_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_gqa_dir)
    assert model.config.num_key_value_heads == 2
    assert not model.config.tie_word_embeddings


def test_tiny_tokenizer_is_the_same_on_every_build(tmp_path):
    # Everything the demo trains reads these ids: a tokenizer that changed from one build to
    # the next (`tokenizers`' unigram trainer did) made no two demo runs alike.
    extra = "回答できません。その理由は、危険だからです。\n日本の首都は東京です。\n"
    first = build_tiny_tokenizer(tmp_path / "a", extra_text=extra)
    second = build_tiny_tokenizer(tmp_path / "b", extra_text=extra)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert first.get_vocab() == second.get_vocab()
