"""Preference optimization (DPO / IPO) on megatron-core, and judge-made preference pairs."""
