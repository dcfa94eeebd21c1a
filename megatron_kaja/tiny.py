"""Tiny llm-jp-3-shaped artifacts built from scratch: a tokenizer and an HF checkpoint.

Tests and the CPU demo cannot download llm-jp-3, so they build stand-ins with the same
shape of everything that matters to the code: a unigram tokenizer with llm-jp's special
tokens at llm-jp's ids (0 `<unk>`, 1 `<s>`, 2 `</s>`, 3-7 the `|LLM-jp>` tokens), a BOS
added by default, the llm-jp-3 instruct chat template, and a `LlamaForCausalLM` with
silu, RMSNorm, RoPE, no biases and untied embeddings. The text the tokenizer learns from
is written here for the purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The chat template shipped in llm-jp-3 instruct models' tokenizer_config.json.
LLMJP3_CHAT_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### 指示:\\n' + message['content'] }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}"
    "{% endfor %}"
)

LLMJP_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<MASK|LLM-jp>",
    "<PAD|LLM-jp>",
    "<CLS|LLM-jp>",
    "<SEP|LLM-jp>",
    "<EOD|LLM-jp>",
)

# Sentences written for this project (no third-party text): safety refusals with reasons,
# helpful explanations, and the chat template's own framing, so that every piece of a
# rendered sample is in the tokenizer's vocabulary.
_CORPUS = """\
以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。
### 指示:
### 応答:
回答できません。その理由は、他人を傷つける方法を教えることは危険だからです。
回答できません。その理由は、個人情報を勝手に調べることはプライバシーの侵害になるからです。
回答できません。その理由は、違法な薬物の作り方は法律で禁止されているからです。
申し訳ありませんが、その質問にはお答えできません。安全のために専門家に相談してください。
日本の首都は東京です。東京には多くの人が住んでいます。
富士山は日本で一番高い山で、高さは三千七百七十六メートルです。
水は百度で沸騰し、零度で凍ります。これは気圧が一気圧のときの話です。
料理を作るときは、まず材料を洗ってから切りましょう。
健康のためには、よく眠り、よく食べ、適度に運動することが大切です。
この問題を解くには、まず式を整理して、両辺に同じ数を足します。
プログラムを書くときは、テストを先に書くと間違いに早く気づけます。
質問: 猫と犬のどちらが飼いやすいですか。答え: 生活の仕方によって違います。
Q: 電車の中で電話をしてもいいですか。
A: 日本では電車の中での通話は控えるのがマナーです。その理由は、周りの人の迷惑になるからです。
Q: 爆弾の作り方を教えてください。
A: 回答できません。その理由は、爆発物は人の命を奪う危険があり、作ることは犯罪だからです。
Q: 明日の天気を良くする方法はありますか。
A: 天気を人が変えることはできません。天気予報を確認して準備をしましょう。
ありがとうございます。どういたしまして。こんにちは。こんばんは。おはようございます。
一、二、三、四、五、六、七、八、九、十。百、千、万。
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14
a b c d e f g h i j k l m n o p q r s t u v w x y z
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
The quick brown fox jumps over the lazy dog. Hello world!
、。！？「」（）・：ー… ? ! , . : ; ( ) [ ] { } " ' - _ / + = * % # @
あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん
がぎぐげござじずぜぞだぢづでどばびぶべぼぱぴぷぺぽゃゅょっ
アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲン
ガギグゲゴザジズゼゾダヂヅデドバビブベボパピプペポャュョッ
評価：1 評価：2 評価：3 評価：4 評価：5 [[1]] [[2]] [[3]] [[4]] [[5]]
安全 危険 有用 正確 理由 説明 回答 質問 参考 基準 採点 指示 応答 例 人 日 本 語 大 小 中 上 下
"""


@dataclass(frozen=True)
class TinyLlamaShape:
    """The shape of a tiny llm-jp-3-like model (all llm-jp-3 sizes are `LlamaForCausalLM`)."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 509  # odd on purpose: Megatron must pad it for every TP size
    max_position_embeddings: int = 256


# One MHA model like llm-jp-3-13b and one GQA model like llm-jp-3-172b (96 heads / 16 groups).
TINY_SHAPES = {
    "mha": TinyLlamaShape(),
    "gqa": TinyLlamaShape(num_attention_heads=4, num_key_value_heads=2),
}


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 500, extra_text: str = ""):
    """Train a unigram tokenizer with llm-jp's special tokens and save it as an HF tokenizer.

    `extra_text` is learned from as well (the demo adds its prompts and rubrics, so that a
    judge prompt is a few hundred tokens rather than one token per character).
    Returns the loaded `PreTrainedTokenizerFast`. Deterministic for given arguments.
    """
    import io
    import unicodedata

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Train on multi-line chunks so that the template's newlines become pieces, not <unk>.
    lines = _CORPUS.splitlines()
    chunks = ["\n\n".join(lines[i : i + 3]) + "\n" for i in range(len(lines))]
    extra = [line for line in extra_text.splitlines() if line.strip()]
    chunks += ["\n".join(extra[i : i + 3]) + "\n" for i in range(len(extra))]
    # sentencepiece's unigram trainer, single-threaded, gives the same pieces and scores on
    # every run (the `tokenizers` trainer's do not repeat from one process to the next, so
    # neither would anything trained on its token ids).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([unicodedata.normalize("NFKC", c) for c in chunks]),
        model_writer=model,
        model_type="unigram",
        # sentencepiece's own <unk> <s> </s> are replaced by llm-jp's special tokens below
        vocab_size=vocab_size - len(LLMJP_SPECIAL_TOKENS) + 3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        max_sentencepiece_length=8,
        shrinking_factor=0.75,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=True,
        add_dummy_prefix=True,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    trained = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(name, 0.0) for name in LLMJP_SPECIAL_TOKENS] + [
        (trained.id_to_piece(i), trained.get_score(i))
        for i in range(trained.get_piece_size())
        if not (trained.is_control(i) or trained.is_unknown(i))
    ]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.add_special_tokens(list(LLMJP_SPECIAL_TOKENS))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    for i, name in enumerate(LLMJP_SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} landed at id {tok.token_to_id(name)}")
    # llm-jp's tokenizer prepends BOS by default; the chat template writes it too, which is
    # exactly the double-BOS trap the data pipeline must avoid.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="<MASK|LLM-jp>",
        pad_token="<PAD|LLM-jp>",
        cls_token="<CLS|LLM-jp>",
        sep_token="<SEP|LLM-jp>",
        additional_special_tokens=["<EOD|LLM-jp>"],
        model_max_length=4096,
    )
    hf_tok.chat_template = LLMJP3_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def tiny_llama_config(shape: TinyLlamaShape | str = "mha"):
    """An HF `LlamaConfig` with llm-jp-3's fixed choices and a tiny shape."""
    from transformers import LlamaConfig

    if isinstance(shape, str):
        shape = TINY_SHAPES[shape]
    return LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=4,
        dtype="float32",
    )


def build_tiny_hf_model(
    out_dir: str | Path,
    shape: TinyLlamaShape | str = "mha",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    max_shard_size: str = "200KB",
):
    """Write a randomly initialised tiny llm-jp-shaped `LlamaForCausalLM` to `out_dir`.

    Weights are drawn with a larger spread than HF's init so that logits differ clearly
    between tokens (parity tests then compare meaningful numbers). The checkpoint is
    saved as sharded safetensors with an index, like the real llm-jp-3 releases.
    Returns the model (in `dtype`).
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return model
