"""Scoring model responses to an eval set (lwm_data.text.evalset) with RULER's metrics (Hsieh et al.
2024, arXiv 2404.06654; its `scripts/eval/synthetic/constants.py`):

- `string_match_all` (niah_*, variable_tracking, common_words, frequent_words): the share of the
  expected values found in the response, case-insensitive (recall);
- `string_match_part` (book_qa): 1 when any expected answer is found in the response, else 0.

A row scores in 0..1; accuracy is the mean over rows, per task x length x depth (`grids`), per task x
length (`summary`'s `tasks`), and RULER's average per length, the mean of the tasks' accuracies at that
length (`summary`'s `average`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lwm_data.text.evalset import BOOK_QA, TASKS
from lwm_data.text.needle import AccuracyGrid


def string_match_all(response: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all for one row: the share of `answers` in the response (case-insensitive)."""
    text = response.lower()
    return sum(a.lower() in text for a in answers) / len(answers) if answers else 0.0


def string_match_part(response: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part for one row: 1 if any answer is in the response (case-insensitive)."""
    text = response.lower()
    return float(any(a.lower() in text for a in answers))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    task: string_match_part if task == BOOK_QA else string_match_all for task in TASKS
}


def score_row(row: dict) -> float:
    """A RESPONSES_SCHEMA row's score (a task this version does not know is scored by recall)."""
    return METRICS.get(row["task"], string_match_all)(row["response"], row["answers"])


def scored_rows(rows: Iterable[dict]) -> list[dict]:
    """task, context_length, depth (None: spread out), example_id and score of each response."""
    return [
        {
            "example_id": r["example_id"],
            "task": r["task"],
            "context_length": int(r["context_length"]),
            "depth": None if r["depth"] is None else round(float(r["depth"]), 6),
            "score": score_row(r),
        }
        for r in rows
    ]


def _task_order(tasks: Iterable[str]) -> list[str]:
    return sorted(set(tasks), key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))


def summary(scored: Sequence[dict]) -> dict:
    """`{"tasks": {task: {length: accuracy}}, "average": {length: accuracy}}` (lengths as strings, JSON's
    keys), accuracies in 0..1 rounded to 4 places; the average is over the tasks scored at that length."""
    totals: dict[str, dict[int, list[float]]] = {}
    for r in scored:
        totals.setdefault(r["task"], {}).setdefault(r["context_length"], []).append(r["score"])
    tasks = {
        task: {str(n): round(float(np.mean(s)), 4) for n, s in sorted(totals[task].items())}
        for task in _task_order(totals)
    }
    lengths = sorted({r["context_length"] for r in scored})
    average = {}
    for n in lengths:
        values = [by_length[str(n)] for by_length in tasks.values() if str(n) in by_length]
        average[str(n)] = round(float(np.mean(values)), 4)
    return {"tasks": tasks, "average": average}


def grids(scored: Sequence[dict]) -> dict[str, AccuracyGrid]:
    """Per task, accuracy by length x depth (one depth NaN for tasks spread out), as needle's grid."""
    found = {}
    for task in _task_order(r["task"] for r in scored):
        rows = [r for r in scored if r["task"] == task]
        lengths = sorted({r["context_length"] for r in rows})
        depths = sorted({np.nan if r["depth"] is None else r["depth"] for r in rows}, key=lambda d: (np.isnan(d), d))
        total = np.zeros((len(lengths), len(depths)))
        counts = np.zeros((len(lengths), len(depths)), np.int64)
        for r in rows:
            j = next(k for k, d in enumerate(depths) if (np.isnan(d) and r["depth"] is None) or d == r["depth"])
            i = lengths.index(r["context_length"])
            total[i, j] += r["score"]
            counts[i, j] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
        found[task] = AccuracyGrid(lengths, depths, accuracy, counts)
    return found
