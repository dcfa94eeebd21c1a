"""megatron_kaja: safety + helpfulness tuning of llm-jp-3 models on Megatron-Core."""

__version__ = "0.1.0"
