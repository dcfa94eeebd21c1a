"""What an evaluation output folder was made from, so that it is never resumed with
something else: `OUT/manifest.json` records the answer model, the datasets, the judge and
the protocol with hashes; a rerun into the same folder must match it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_kaja.eval.protocols import file_sha256

MANIFEST_FILE = "manifest.json"
# Weight files are fingerprinted by size and their first and last MiB: cheap for a 13b model
# (no full read), and two different trainings never share them.
_EDGE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_fingerprint(model: str | None) -> str | None:
    """A hash of a local model folder (config, tokenizer, weight files' sizes and edges);
    for a served or hub model name, the name itself."""
    if model is None:
        return None
    path = Path(model)
    if not path.is_dir():
        return f"name:{model}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        size = file.stat().st_size
        digest.update(str(size).encode())
        with file.open("rb") as f:
            if file.suffix in _WEIGHT_SUFFIXES and size > 2 * _EDGE_BYTES:
                digest.update(f.read(_EDGE_BYTES))
                f.seek(size - _EDGE_BYTES)
                digest.update(f.read(_EDGE_BYTES))
            else:
                digest.update(f.read())
    return digest.hexdigest()


def build_manifest(cfg, protocol: dict) -> dict:
    """The identity of a run of `cfg` (an `EvalConfig`) under `protocol` (its description)."""
    datasets = {
        kind: {"path": str(Path(p).resolve()), "sha256": file_sha256(p), "answers": "generated"}
        for kind, p in cfg.datasets.items()
    }
    datasets.update(
        {
            kind: {"path": str(Path(p).resolve()), "sha256": file_sha256(p), "answers": "given"}
            for kind, p in cfg.predictions.items()
        }
    )
    return {
        "model": cfg.model,
        "model_fingerprint": model_fingerprint(cfg.model) if cfg.datasets else None,
        "generation": {
            "backend": cfg.gen_backend,
            "max_new_tokens": cfg.gen_max_tokens,
            "system_prompt": cfg.system_prompt,
            "seed": cfg.seed,
        }
        if cfg.datasets
        else None,
        "datasets": datasets,
        "judge": {
            "backend": cfg.judge_backend,
            "model": cfg.judge_model,
            "fingerprint": model_fingerprint(cfg.judge_model)
            if cfg.judge_backend != "openai"
            else f"name:{cfg.judge_model}",
        },
        "protocol": protocol,
    }


def _identity(manifest: dict) -> dict:
    # Paths may move (a copied dataset, a mounted folder): contents decide.
    out = json.loads(json.dumps(manifest))
    for entry in out.get("datasets", {}).values():
        entry.pop("path", None)
    return out


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_manifest(out_dir: Path, manifest: dict) -> None:
    """Write `manifest` into a new folder, or check that an existing folder was made from
    the same model, data, judge and protocol. Raises ValueError naming what differs."""
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        if any(out_dir.glob("*/judgements.jsonl")) or any(out_dir.glob("*/predictions.jsonl")):
            raise ValueError(
                f"--out {out_dir} holds an evaluation without {MANIFEST_FILE} (made by an older "
                "version): its origin cannot be checked. Use another --out."
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(path)
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = _differences(_identity(previous), _identity(manifest))
    if changed:
        first = changed[0]

        def pick(m):
            value = m
            for part in first.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return value

        raise ValueError(
            f"--out {out_dir} was made from something else ({', '.join(changed)} differ; "
            f"{first}: {pick(_identity(previous))!r} there, {pick(_identity(manifest))!r} now). "
            "Use another --out."
        )
