import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_kaja.inference import GenerationRequest, build_backend

MSG = [{"role": "user", "content": "富士山の高さは?"}]


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return build_backend("hf", model=str(tiny_hf_dir), batch_size=4)


def test_choice_logprobs_are_the_next_token_distribution(hf, tiny_hf_dir):
    req = GenerationRequest(messages=MSG, choices=("1", "2", "3", "4", "5"), top_logprobs=5)
    [res] = hf.generate([req])
    # By hand: render, encode without special tokens (the template writes BOS), forward.
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    text = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    for choice, got in res.choice_logprobs.items():
        [cid] = tok(text + choice, add_special_tokens=False)["input_ids"][len(ids) :]
        assert got == pytest.approx(lp[cid].item(), abs=1e-5)
    assert res.text == max(res.choice_logprobs, key=res.choice_logprobs.get)
    assert len(res.top_logprobs[0]) == 5 and res.prompt_tokens == len(ids)


def test_multi_token_choices_are_teacher_forced(hf):
    req = GenerationRequest(messages=MSG, choices=("回答できません。", "東京です。"))
    [res] = hf.generate([req])
    assert set(res.choice_logprobs) == set(req.choices)
    assert all(v < 0 for v in res.choice_logprobs.values())
    assert res.completion_tokens > 1


def test_greedy_batch_equals_one_by_one(hf):
    prompts = ["日本の首都は?", "水は何度で沸騰しますか。説明してください。", "こんにちは"]
    reqs = [
        GenerationRequest(messages=[{"role": "user", "content": p}], max_tokens=6) for p in prompts
    ]
    batched = hf.generate(reqs)
    single = [hf.generate([r])[0] for r in reqs]
    assert [r.text for r in batched] == [r.text for r in single]
    for r in batched:
        assert 1 <= r.completion_tokens <= 6 and r.finish_reason in ("stop", "length")


def test_sampling_is_seeded_and_top_logprobs_per_position(hf):
    req = GenerationRequest(messages=MSG, max_tokens=5, temperature=1.0, seed=3, top_logprobs=3)
    a, b = hf.generate([req])[0], hf.generate([req])[0]
    assert a.text == b.text
    assert len(a.top_logprobs) == a.completion_tokens and all(len(p) <= 3 for p in a.top_logprobs)
