"""metrics.jsonl of a resumed run: each step once, the redone steps' first records dropped."""

import json

from megatron_kaja.training.metrics import MetricsWriter


def _write(path, steps, torn=False):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps]
    path.write_text("".join(lines) + ('{"step": 9, "lo' if torn else ""), encoding="utf-8")


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text("utf-8").splitlines()]


def test_resume_truncates_to_the_resumed_step_so_each_step_appears_once(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    # Saved at step 4, killed after logging step 6 and half of step 7's line.
    _write(metrics, [1, 2, 3, 4, 5, 6], torn=True)
    writer = MetricsWriter(metrics, enabled=True, resume_from_step=4)
    for step in (5, 6, 7, 8):
        writer.log({"step": step, "loss": 0.5})
    writer.close()
    assert _steps(metrics) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [p.name for p in metrics.parent.iterdir()] == ["metrics.jsonl"]  # no temp left


def test_a_new_run_starts_a_new_file_and_other_ranks_touch_nothing(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [1, 2, 3])
    MetricsWriter(metrics, enabled=False, resume_from_step=1).close()
    assert _steps(metrics) == [1, 2, 3]  # not the writer rank: untouched
    MetricsWriter(metrics, enabled=True, resume_from_step=0).close()
    assert metrics.read_text("utf-8") == ""
    _write(metrics, [1, 2])
    MetricsWriter(metrics, enabled=True).close()  # no resume step given: appended to
    assert _steps(metrics) == [1, 2]
