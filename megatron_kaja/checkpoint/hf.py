"""HF checkpoints: a lazy reader that checks tensors against the architecture, and the
config / tokenizer files written beside converted weights.

The tensors themselves are read and written by `megatron_kaja.checkpoint.safetensors_io`
(one tensor in memory at a time), so a 26 GB llm-jp-3-13b converts on a 24 GiB machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.safetensors_io import SafetensorsFolder
from megatron_kaja.models.llama.config import LlamaArch

# Files that make up an HF tokenizer; whichever exist are copied (and compared by merges).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


class HFCheckpointReader(SafetensorsFolder):
    """Lazy access to the tensors of an llm-jp-3 HF checkpoint folder (safetensors only)."""

    def __init__(self, hf_dir: str | Path):
        path = Path(hf_dir)
        if not path.is_dir():
            raise CheckpointError(f"HF checkpoint folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json")
        self.arch = LlamaArch.from_hf_config(path)
        self.config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        super().__init__(path)

    def validate(self, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError naming missing, unexpected and misshapen tensors."""
        present = set(self.keys())
        missing = [k for k in expected_shapes if k not in present]
        # HF may store non-persistent buffers; rotary inv_freq is recomputed, not converted.
        unexpected = sorted(
            k for k in present - set(expected_shapes) if not k.endswith("rotary_emb.inv_freq")
        )
        problems = []
        if missing:
            problems.append(
                f"missing tensors: {', '.join(missing[:8])}" + (" ..." * (len(missing) > 8))
            )
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}")
        for key, shape in expected_shapes.items():
            if key in present and self.shape(key) != tuple(shape):
                problems.append(
                    f"tensor {key} has shape {self.shape(key)}, expected {tuple(shape)}"
                )
        if problems:
            raise CheckpointError(f"{self.path}: " + "; ".join(problems))


def hf_config_dict(arch: LlamaArch, dtype: str, template_dir: Path | None) -> dict:
    """The HF config.json of `arch`, on top of the template's config when there is one."""
    config = arch.to_hf_config(dtype)
    if template_dir is None or not (template_dir / "config.json").is_file():
        return config
    # Keep the template's other fields (e.g. its exact transformers version, extra ids).
    template = json.loads((template_dir / "config.json").read_text(encoding="utf-8"))
    template.update({k: v for k, v in config.items() if k != "rope_theta"})
    if "dtype" in template:  # transformers 5 spelling, read before torch_dtype
        template["dtype"] = dtype
    if "rope_parameters" not in template:
        template["rope_theta"] = arch.rope_theta
    return template


def write_hf_metadata(
    out_dir: Path, arch: LlamaArch, dtype: str, template_dir: Path | None
) -> None:
    """config.json, generation_config.json and (from the template) tokenizer files."""
    config = hf_config_dict(arch, dtype, template_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
    }
    if template_dir is not None and (template_dir / "generation_config.json").is_file():
        shutil.copy2(template_dir / "generation_config.json", out_dir / "generation_config.json")
    else:
        (out_dir / "generation_config.json").write_text(
            json.dumps(generation, indent=2) + "\n", encoding="utf-8"
        )
    if template_dir is not None:
        for name in TOKENIZER_FILES:
            if (template_dir / name).is_file():
                shutil.copy2(template_dir / name, out_dir / name)
