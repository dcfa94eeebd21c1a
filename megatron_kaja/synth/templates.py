"""Teacher prompt templates: a question/answer pair per kind, kept as YAML data files.

The defaults (`templates/safety.yaml`, `templates/helpful.yaml`) are the seed's four prompts
verbatim. A user file with the same fields overrides a kind. `{question}` is the only
placeholder and is filled with `str.replace`, not `str.format`, so that braces elsewhere in
a user's template (JSON examples, say) are kept as written.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

TEMPLATE_DIR = Path(__file__).parent / "templates"
KINDS = ("safety", "helpful")
PLACEHOLDER = "{question}"


class TemplatePair(BaseModel):
    """The two prompts of one kind: make a new question like a seed, then answer it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    question: str
    answer: str

    @field_validator("question", "answer")
    @classmethod
    def _one_placeholder(cls, text: str) -> str:
        if text.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"must hold the placeholder {PLACEHOLDER} exactly once "
                f"(found {text.count(PLACEHOLDER)} times)"
            )
        return text

    def question_prompt(self, seed_question: str) -> str:
        """The first prompt: write a question similar to `seed_question`."""
        return self.question.replace(PLACEHOLDER, seed_question)

    def answer_prompt(self, question: str) -> str:
        """The second prompt: answer `question`, shown as the teacher wrote it (`Q: ...`)."""
        return self.answer.replace(PLACEHOLDER, f"Q: {question}")


def load_template_pair(name_or_path: str | Path) -> TemplatePair:
    """A built-in pair by kind (`safety`, `helpful`) or a YAML file with the same fields."""
    path = Path(name_or_path)
    if str(name_or_path) in KINDS:
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"template file {path} not found (built-in template pairs: {', '.join(KINDS)})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'name', 'question', 'answer'")
    try:
        return TemplatePair(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{path}: {problems}") from None


def load_templates(overrides: dict[str, str] | None = None) -> dict[str, TemplatePair]:
    """The template pair of every kind: the built-in one unless `overrides[kind]` names a file."""
    overrides = overrides or {}
    unknown = set(overrides) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown template kind(s) {sorted(unknown)}; choose from {KINDS}")
    return {kind: load_template_pair(overrides.get(kind, kind)) for kind in KINDS}
