"""`--dry-run` reads every data file through the run's own readers and validators: a file
the run would stop on fails the dry run with the same file:line message."""

import json

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.preference.trainer import main as dpo_main
from megatron_kaja.rl.trainer import main as grpo_main
from megatron_kaja.training.sft import main as sft_main
from tests.helpers import REPO

GOOD = {"text": "日本の首都は?", "output": "東京です。"}


def _jsonl(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), "utf-8")
    return path


def test_trainers_dry_run_fails_on_a_malformed_record(tmp_path, tiny_hf_dir, capsys, caplog):
    mc = tmp_path / "mc"
    hf_to_mcore(tiny_hf_dir, mc, progress=False)
    good = json.dumps(GOOD, ensure_ascii=False)
    data = _jsonl(tmp_path / "sft.jsonl", good, good, '{"text": "質問だけ"}')
    argv = ["--tokenizer", str(tiny_hf_dir), "--load", str(mc), "--dry-run", "--world-size", "1"]
    assert sft_main([*argv, "--train-data", str(data)]) == 2
    assert f"{data}:3" in caplog.text and "result: OK" not in capsys.readouterr().out
    _jsonl(data, good, good)
    assert sft_main([*argv, "--train-data", str(data)]) == 0
    assert f"{data}: 2 records, all valid" in capsys.readouterr().out

    prompts = _jsonl(tmp_path / "prompts.jsonl", good, "[1, 2]")
    grpo = [*argv, "--reward", "refusal_with_reason", "--global-batch-size", "8"]
    caplog.clear()
    assert grpo_main([*grpo, "--prompts", f"{prompts}:safety"]) == 2
    assert f"{prompts}:2: a prompt record is a JSON object" in caplog.text
    _jsonl(prompts, good)
    assert grpo_main([*grpo, "--prompts", f"{prompts}:safety"]) == 0
    assert f"{prompts}: 1 records, all valid" in capsys.readouterr().out

    pair = {"prompt": "日本の首都は?", "chosen": "東京です。", "rejected": "知りません。"}
    pairs = _jsonl(tmp_path / "pairs.jsonl", json.dumps(pair), json.dumps({"prompt": "p"}))
    caplog.clear()
    assert dpo_main([*argv, "--train-data", str(pairs), "--global-batch-size", "4"]) == 2
    assert f"{pairs}:2" in caplog.text and "chosen" in caplog.text
    _jsonl(pairs, json.dumps(pair))
    assert dpo_main([*argv, "--train-data", str(pairs), "--global-batch-size", "4"]) == 0
    assert f"{pairs}: 1 records, all valid" in capsys.readouterr().out


def test_tools_dry_run_fails_on_a_malformed_record(tmp_path, capsys):
    import subprocess
    import sys

    bad = _jsonl(tmp_path / "seeds.jsonl", json.dumps(GOOD, ensure_ascii=False), '{"ID": "x"}')
    runs = {
        "generate_sft_data.py": ["--seeds", f"{bad}:safety", "--samples-per-seed", "1",
                                 "--model", "m", "--base-url", "http://127.0.0.1:9/v1"],
        "evaluate.py": ["--predictions", f"safety={bad}", "--judge-model", "j"],
    }  # fmt: skip
    for tool, args in runs.items():
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / tool), *args, "--out", str(tmp_path / "o"),
             "--dry-run"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, (tool, proc.stdout, proc.stderr)
        # Seeds lack 'text' on line 2; as predictions, line 1 already lacks 'prediction'.
        line = 2 if tool == "generate_sft_data.py" else 1
        assert f"result: {bad}:{line}: missing field" in proc.stdout, (tool, proc.stdout)
