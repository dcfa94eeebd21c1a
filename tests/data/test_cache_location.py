"""The tokenization cache goes to the user's cache directory, never the current one."""

from __future__ import annotations

from megatron_kaja.data import DataSource, SFTDataConfig, build_sft_dataset
from tests.data.conftest import qa_records, write_jsonl


def test_default_cache_is_in_the_users_cache_directory(tmp_path, monkeypatch, llmjp_tokenizer):
    source = DataSource(path=str(write_jsonl(tmp_path / "a.jsonl", qa_records(3))))
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = SFTDataConfig(sources=[source], seq_length=128)
    assert config.cache_dir == tmp_path / "xdg" / "megatron_kaja" / "sft_tokens"
    build_sft_dataset(config, llmjp_tokenizer)
    assert list(work.iterdir()) == []  # nothing written where the run was started
    assert len(list(config.cache_dir.iterdir())) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = SFTDataConfig(sources=[source], seq_length=128)
    assert config.cache_dir == tmp_path / "home" / ".cache" / "megatron_kaja" / "sft_tokens"
