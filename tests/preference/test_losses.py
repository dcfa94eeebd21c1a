"""Preference losses against TRL's own `DPOTrainer` loss on the same log-probs (loss and
gradients), label smoothing against its formula, and the pair records' error messages."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer

from megatron_kaja.data.records import DataFormatError
from megatron_kaja.data.sources import DataSource
from megatron_kaja.preference.data import build_preference_dataset, collate_pairs
from megatron_kaja.preference.losses import AnswerLogps, preference_loss

PAIRS, LENGTH = 5, 9


def _inputs(seed: int):
    """Per-token log-probs of 2 x PAIRS answers (chosen rows first, as TRL and we batch
    them), completion masks of various lengths, and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(2 * PAIRS, LENGTH, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2 * PAIRS, LENGTH + 1, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = 1 + row % 3
        mask[row, start : start + 2 + row % (LENGTH - 3)] = 1
    ref = -torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 10
    return token_logps, mask, ref


def _trl_loss(token_logps, mask, ref, loss_types, loss_weights, beta):
    """TRL 1.16's `DPOTrainer._compute_loss` with a model that returns our log-probs."""
    shifted = mask[:, 1:]
    logps = token_logps * shifted  # what TRL's fused head returns: 0 outside the completion
    outputs = SimpleNamespace(
        log_probs=logps,
        entropy=torch.zeros_like(logps),
        mean_logits=torch.zeros_like(logps),
        is_top1=torch.zeros_like(logps, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:PAIRS],
        "ref_rejected_logps": ref[PAIRS:],
    }
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


def _our_loss(token_logps, mask, ref, loss_type, beta, sft_weight=0.0, label_smoothing=0.0):
    """Our loss as the trainer computes it: the global batch's mean pair loss plus the
    weighted token-mean NLL of the chosen answers."""
    shifted = mask[:, 1:].to(token_logps.dtype)
    summed = (token_logps * shifted).sum(dim=1)
    tokens = shifted.sum(dim=1)
    logps = AnswerLogps(
        summed[:PAIRS], summed[PAIRS:], ref[:PAIRS], ref[PAIRS:], tokens[:PAIRS], tokens[PAIRS:]
    )
    loss = preference_loss(loss_type)(logps, beta, label_smoothing).mean()
    if sft_weight:
        nll = -(token_logps[:PAIRS] * shifted[:PAIRS]).sum() / shifted[:PAIRS].sum()
        loss = loss + sft_weight * nll
    return loss


@pytest.mark.parametrize(
    ("loss_type", "beta", "sft_weight"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.3), ("ipo", 0.1, 0.0), ("ipo", 0.02, 1.0)],
)
def test_loss_and_gradients_equal_trl(loss_type, beta, sft_weight):
    token_logps, mask, ref = _inputs(seed=7)
    ours_in = token_logps.clone().requires_grad_(True)
    trl_in = token_logps.clone().requires_grad_(True)
    ours = _our_loss(ours_in, mask, ref, loss_type, beta, sft_weight)
    types, weights = [loss_type], [1.0]
    if sft_weight:
        types, weights = [loss_type, "sft"], [1.0, sft_weight]
    reference = _trl_loss(trl_in, mask, ref, types, weights, beta)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-10, atol=1e-14)
    assert ours_in.grad.abs().sum() > 0


def test_label_smoothing_is_conservative_dpo():
    """-(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (cDPO); eps 0 is plain DPO."""
    token_logps, mask, ref = _inputs(seed=3)
    shifted = mask[:, 1:].to(token_logps.dtype)
    summed = (token_logps * shifted).sum(dim=1)
    h = (summed[:PAIRS] - ref[:PAIRS]) - (summed[PAIRS:] - ref[PAIRS:])
    expected = (-(0.8) * F.logsigmoid(0.3 * h) - 0.2 * F.logsigmoid(-0.3 * h)).mean()
    smoothed = _our_loss(token_logps, mask, ref, "sigmoid", 0.3, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, expected, rtol=1e-12, atol=0)
    plain = _our_loss(token_logps, mask, ref, "sigmoid", 0.3)
    torch.testing.assert_close(plain, -F.logsigmoid(0.3 * h).mean(), rtol=1e-12, atol=0)


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_pairs_render_with_the_chat_template_and_learn_only_the_answer(tmp_path, tiny_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    records = [
        {"prompt": "日本の首都は?", "chosen": "東京です。", "rejected": "大阪です。"},
        {
            "prompt": [
                {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": "こんにちは。"},
                {"role": "user", "content": "富士山の高さは?"},
            ],
            "chosen": [{"role": "assistant", "content": "3776メートルです。"}],
            "rejected": [{"role": "assistant", "content": "知りません。"}],
        },
    ]
    dataset = build_preference_dataset(
        [DataSource(path=str(_write(tmp_path / "p.jsonl", records)))], tokenizer, 64, seed=0
    )
    assert len(dataset) == 2
    batch = collate_pairs(dataset.pair_rows([0, 1], packing=False), 2)
    assert batch["tokens"].shape == (4, 64)
    for row in range(4):
        learned = batch["labels"][row][batch["loss_mask"][row] > 0].tolist()
        text = tokenizer.decode(learned)
        assert learned[-1] == tokenizer.eos_token_id  # the answer is learned up to its EOS
        assert "指示" not in text and "こんにちは" not in text, text  # never the prompt
    chosen = tokenizer.decode(batch["labels"][1][batch["loss_mask"][1] > 0])
    assert "3776" in chosen and "こんにちは" not in chosen

    # Packed, the four answers share rows; each answer keeps its tokens, labels, mask and
    # positions (restarting at 0), in a segment of its own.
    packed = collate_pairs(dataset.pair_rows([0, 1], packing=True), 2)
    assert packed["tokens"].shape[0] < 4
    for answer in range(4):
        here, alone = packed["sequence_ids"] == answer, batch["sequence_ids"] == answer
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(packed[key][here], batch[key][alone]), (answer, key)
        flat = torch.nonzero(here.flatten()).flatten()
        assert int(flat[0]) in packed["cu_seqlens"].tolist()
        assert int(flat[-1]) + 1 in packed["cu_seqlens"].tolist()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "p.jsonl:2: field 'rejected' is missing"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "p.jsonl:2: field 'rejected' must be"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "p.jsonl:2: field 'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "p.jsonl:2: 'chosen' and 'rejected'"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "p.jsonl:2: field 'prompt' must end with a user turn",
        ),
    ],
)
def test_bad_pairs_are_named_by_file_line_and_field(tmp_path, tiny_hf_dir, record, message):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "p.jsonl", [good, record])
    with pytest.raises(DataFormatError, match=message.replace("(", r"\(")):
        build_preference_dataset([DataSource(path=str(path))], tokenizer, 64, seed=0)
