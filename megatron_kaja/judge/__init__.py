"""LLM judge: rubrics (data files), score reading, the judge, and reward callables."""

from megatron_kaja.judge.cache import JudgeCache
from megatron_kaja.judge.judge import JudgeConfig, Judgement, JudgeSample, LLMJudge, read_score
from megatron_kaja.judge.rubric import (
    EVAL_RUBRIC_BY_KIND,
    REWARD_RUBRIC_BY_KIND,
    Rubric,
    builtin_rubrics,
    fence,
    load_rubric,
)
from megatron_kaja.judge.scores import (
    expected_judge_score,
    mask_quoted,
    parse_score,
    score_distribution,
)

__all__ = [
    "EVAL_RUBRIC_BY_KIND",
    "REWARD_RUBRIC_BY_KIND",
    "JudgeCache",
    "JudgeConfig",
    "JudgeSample",
    "Judgement",
    "LLMJudge",
    "Rubric",
    "builtin_rubrics",
    "expected_judge_score",
    "fence",
    "load_rubric",
    "mask_quoted",
    "parse_score",
    "read_score",
    "score_distribution",
]
