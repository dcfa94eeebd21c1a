"""megatron_kaja: safety + helpfulness tuning of llm-jp-3 models on Megatron-Core."""

from megatron_kaja.extras import silence_known_warnings

__version__ = "0.1.0"

# Before megatron-core is first imported, so that its import-time warnings are filtered too.
silence_known_warnings()
