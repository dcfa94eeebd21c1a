"""Rollout engines: the in-memory HF export of a live model, the `hf` engine fed by it, the
chunked sampling, and vLLM's output conversion (vLLM itself needs a GPU: not run here)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_kaja.models.llama.export import hf_weight_groups
from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.rl.engines import (
    BuiltinEngine,
    HFEngine,
    generation_from_token_lists,
    response_mask,
    row_seeds,
)
from megatron_kaja.rl.rollout import sample_in_chunks
from megatron_kaja.rl.sampler import SamplingParams
from megatron_kaja.rl.step import response_logprobs

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 99, 17], [1, 300, 301, 302, 12]]
PAD = 4


def _hf_state(hf_dir):
    state = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def _engines(model, arch):
    builtin = BuiltinEngine(
        model, eos_token_id=arch.eos_token_id, pad_token_id=PAD, vocab_size=arch.vocab_size
    )
    hf = HFEngine(
        arch,
        eos_token_id=arch.eos_token_id,
        pad_token_id=PAD,
        dtype=torch.float32,
        device=compute_device(),
    )
    return builtin, hf


def test_export_of_a_loaded_model_is_the_hf_checkpoint(tiny_policy, tiny_hf_dir):
    model, arch = tiny_policy
    exported = [pair for group in hf_weight_groups(model, arch) for pair in group]
    names = [name for name, _ in exported]
    assert len(names) == len(set(names))
    original = _hf_state(tiny_hf_dir)
    assert set(names) == set(original)
    for name, tensor in exported:  # the padded vocabulary rows are cut, fused tensors split
        assert torch.equal(tensor, original[name].to(tensor)), name


def test_hf_engine_samples_what_the_builtin_sampler_samples(tiny_policy):
    model, arch = tiny_policy
    builtin, hf = _engines(model, arch)
    with pytest.raises(RuntimeError, match="no weights yet"):
        hf.generate(PROMPTS, SamplingParams(4, temperature=0.0))
    hf.load_weights(model)
    greedy = SamplingParams(12, temperature=0.0)
    ours, theirs = builtin.generate(PROMPTS, greedy), hf.generate(PROMPTS, greedy)
    assert torch.equal(theirs.response_ids, ours.response_ids)
    assert torch.equal(theirs.response_mask, ours.response_mask)
    torch.testing.assert_close(theirs.logprobs, ours.logprobs, atol=1e-4, rtol=0)
    # Sampled rows: the recorded log-probs are those of the temperature-scaled distribution,
    # which the training forward recomputes; and the same generator seed samples alike.
    params = SamplingParams(10, temperature=0.7)
    seeded = lambda: torch.Generator(device=compute_device()).manual_seed(2)  # noqa: E731
    sampled = hf.generate(PROMPTS * 3, params, seeded())
    again = hf.generate(PROMPTS * 3, params, seeded())
    assert torch.equal(sampled.response_ids, again.response_ids)
    assert sampled.response_ids.size(1) > 1 and sampled.response_ids.unique().numel() > 5
    with torch.no_grad():
        recomputed = response_logprobs(
            model, sampled, slice(None), temperature=0.7, vocab_size=arch.vocab_size
        )
    mask = sampled.response_mask
    torch.testing.assert_close(sampled.logprobs[mask], recomputed[mask], atol=1e-4, rtol=0)
    assert (sampled.response_ids[~mask] == PAD).all() and (sampled.logprobs[~mask] == 0).all()


def test_per_row_generators_make_engines_batch_invariant_and_alike(tiny_policy):
    """One generator per row: a row samples the same tokens whatever else is in its batch,
    and the hf engine (the builtin sampler's rule on transformers' forward) samples the same
    tokens as the builtin engine; vLLM requests take one seed from each row's generator."""
    model, arch = tiny_policy
    builtin, hf = _engines(model, arch)
    hf.load_weights(model)
    params = SamplingParams(8, temperature=1.2, top_p=0.9)
    prompts = PROMPTS * 2

    def gens(rows):
        return [torch.Generator().manual_seed(100 + r) for r in rows]

    whole = builtin.generate(prompts, params, gens(range(6)))
    assert len({tuple(r) for r in whole.responses()}) == 6
    alone = builtin.generate(prompts[4:5], params, gens([4]))  # narrower padding, 1 row
    assert alone.responses() == whole.responses()[4:5]
    theirs = hf.generate(prompts, params, gens(range(6)))
    assert theirs.responses() == whole.responses()
    mask = whole.response_mask
    torch.testing.assert_close(theirs.logprobs[mask], whole.logprobs[mask], atol=1e-4, rtol=0)
    assert row_seeds(gens([3, 4]), 2) == [row_seeds(gens([r]), 1)[0] for r in (3, 4)]
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        row_seeds(gens([0, 1]), 3)


def test_hf_engine_follows_the_trainer_only_after_a_sync(tiny_policy):
    model, arch = tiny_policy
    builtin, hf = _engines(model, arch)
    hf.load_weights(model)
    greedy = SamplingParams(8, temperature=0.0)
    before = hf.generate(PROMPTS, greedy)
    with torch.no_grad():  # an "update" that changes what greedy decoding picks
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    changed = builtin.generate(PROMPTS, greedy)
    assert not torch.equal(changed.response_ids, before.response_ids)
    assert torch.equal(hf.generate(PROMPTS, greedy).response_ids, before.response_ids)  # stale
    hf.load_weights(model)
    assert torch.equal(hf.generate(PROMPTS, greedy).response_ids, changed.response_ids)


def test_chunked_sampling_equals_one_batch_when_greedy(tiny_policy):
    model, arch = tiny_policy
    builtin, _ = _engines(model, arch)
    prompts = PROMPTS * 3
    greedy = SamplingParams(9, temperature=0.0)
    whole = sample_in_chunks(builtin, prompts, greedy, pad_token_id=PAD)
    chunked = sample_in_chunks(builtin, prompts, greedy, pad_token_id=PAD, chunk_size=4)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_response_mask_ends_at_the_first_eos():
    ids = torch.tensor([[5, 2, 2, 4], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert response_mask(ids, 2).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


def test_generation_from_token_lists_pads_both_sides():
    gen = generation_from_token_lists(
        [[1, 7, 8], [1]], [[5, 2], [6, 6, 6]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]], pad_token_id=0
    )
    assert gen.prompt_ids.tolist() == [[1, 7, 8], [0, 0, 1]]
    assert gen.prompt_mask.tolist() == [[True] * 3, [False, False, True]]
    assert gen.response_ids.tolist() == [[5, 2, 0], [6, 6, 6]]
    assert gen.response_mask.tolist() == [[True, True, False], [True] * 3]
    assert gen.logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    assert gen.responses() == [[5, 2], [6, 6, 6]]
    with pytest.raises(ValueError, match="row 1: 1 tokens but 2 log-probs"):
        generation_from_token_lists([[1], [1]], [[5], [6]], [[-1.0], [-1.0, -2.0]], pad_token_id=0)


class _FakeVLLM:
    """vLLM's offline API as `VLLMEngine` uses it (vLLM 0.33: `LLM.sleep/wake_up/apply_model/
    reset_prefix_cache/generate`), enforcing its sleep-mode contract: nothing runs on
    released memory. Records every call."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls, self.loaded = kwargs, [], {}
            self.awake = {"weights": True, "kv_cache": True}

        def sleep(self, level=1):
            assert level == 2
            self.calls.append("sleep")
            self.awake = dict.fromkeys(self.awake, False)

        def wake_up(self, tags=None):
            self.calls.append(f"wake:{','.join(tags)}")
            self.awake.update(dict.fromkeys(tags, True))

        def apply_model(self, fn):
            assert self.awake["weights"], "weights loaded into released memory"
            self.calls.append("apply_model")
            return [fn(self)]

        def load_weights(self, weights):  # the model's own method, reached via apply_model
            self.loaded.update({name: tensor.clone() for name, tensor in weights})
            return {name for name, _ in weights}

        def reset_prefix_cache(self):
            self.calls.append("reset_prefix_cache")

        def generate(self, requests, sampling, use_tqdm=True):
            assert all(self.awake.values()), "generate on a sleeping engine"
            self.calls.append("generate")
            self.sampling = sampling
            outputs = []
            for request, params in zip(requests, sampling, strict=True):
                tokens = [10 + params.seed % 7, request["prompt_token_ids"][-1], 2][
                    : 1 + len(outputs) % 3
                ]
                logprobs = [
                    {t: SimpleNamespace(logprob=-0.25 * (i + 1))} for i, t in enumerate(tokens)
                ]
                completion = SimpleNamespace(token_ids=tokens, logprobs=logprobs)
                outputs.append(SimpleNamespace(outputs=[completion]))
            return outputs


def test_vllm_engine_follows_the_sleep_mode_protocol(tiny_policy, tiny_hf_dir, monkeypatch):
    import json

    from megatron_kaja.rl.engines import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", _FakeVLLM)
    model, arch = tiny_policy
    engine = VLLMEngine(
        arch, tiny_hf_dir, eos_token_id=arch.eos_token_id, pad_token_id=PAD,
        dtype=torch.float32, device=torch.device("cpu"), max_model_len=64,
        gpu_memory_utilization=0.25, seed=7,
    )  # fmt: skip
    llm = engine.llm
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["enable_sleep_mode"]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert (llm.kwargs["tensor_parallel_size"], llm.kwargs["max_model_len"]) == (1, 64)
    folder = Path(llm.kwargs["model"])  # the architecture and tokenizer, not the weights
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == arch.num_layers
    assert (folder / "tokenizer.json").is_file() and not list(folder.glob("*.safetensors"))
    assert llm.calls == ["sleep"]  # asleep until the first weights arrive
    params = SamplingParams(5, temperature=0.9, top_p=0.95)
    with pytest.raises(RuntimeError, match="no weights yet"):
        engine.generate(PROMPTS, params)

    engine.load_weights(model)
    groups = llm.calls.count("apply_model")
    assert groups == arch.num_layers + 2  # layer by layer: never a second full copy at once
    original = _hf_state(tiny_hf_dir)
    assert set(llm.loaded) == set(original)
    assert all(torch.equal(llm.loaded[n].cpu(), original[n].float()) for n in original)
    generator = torch.Generator(device=compute_device()).manual_seed(0)
    gen = engine.generate(PROMPTS * 2, params, generator)
    engine.sleep()
    assert llm.calls == [
        "sleep", "wake:weights", *["apply_model"] * groups, "reset_prefix_cache",
        "wake:kv_cache", "generate", "sleep",
    ]  # fmt: skip
    # One request per row, each with its own seed (the G samples of a prompt must differ),
    # asking for the sampled token's own log-prob; the Generation holds what vLLM returned.
    assert len({p.seed for p in llm.sampling}) == 6
    assert all(p.logprobs == 0 and p.temperature == 0.9 and p.top_p == 0.95 for p in llm.sampling)
    assert gen.response_mask.sum(dim=1).tolist() == [1, 2, 3, 1, 2, 3]
    assert gen.responses()[1][1] == PROMPTS[1][-1]
    assert gen.logprobs[2].tolist() == [-0.25, -0.5, -0.75]
    with pytest.raises(RuntimeError, match="no weights yet"):  # sleep released them
        engine.generate(PROMPTS, params)
    engine.close()
    assert not folder.exists()
