"""The `tokensieve_scenes` task's questions: the small VLM's held-out test questions as a local data file.

Each line of `tasks/tokensieve_scenes/questions.jsonl` is one question of the scene generator's test
split, in split order: its seed (the image is rendered again from it at evaluation time, so the file
stays small), the question, the one-word answer and the question's kind. The first N lines are the
questions `tokensieve bench accuracy --limit N` asks, so the two harnesses can be compared.

    python -m tokensieve.integrations.lmms_eval.scenes_task   # writes the file again (1000 questions)
"""
from __future__ import annotations

import json
from pathlib import Path

from ...smallvlm import scenes as S

SPLIT = "test"
QUESTIONS = 1000
TASK_DIR = Path(__file__).resolve().parent / "tasks" / "tokensieve_scenes"
QUESTIONS_FILE = TASK_DIR / "questions.jsonl"


def question_record(sample: S.Sample) -> dict:
    """The line of one sample: seed, question, answer, kind."""
    return {"seed": sample.seed, "question": sample.question, "answer": sample.answer, "kind": sample.kind}


def question_records(n: int = QUESTIONS) -> list[dict]:
    """The first n questions of the test split, as the file holds them."""
    return [question_record(S.make_sample(S.split_seed(SPLIT, i))) for i in range(n)]


def write_questions(path: str | Path = QUESTIONS_FILE, n: int = QUESTIONS) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(record) + "\n" for record in question_records(n)))
    return path


def image_of(doc: dict):
    """The scene of a task document (PIL RGB 192 x 192), rendered from its seed; ValueError if the
    generator no longer asks the document's question for that seed (the file and the code disagree)."""
    sample = S.make_sample(int(doc["seed"]))
    if (sample.question, sample.answer) != (doc["question"], doc["answer"]):
        raise ValueError(f"seed {doc['seed']} now gives {sample.question!r} -> {sample.answer!r}, the task file says "
                         f"{doc['question']!r} -> {doc['answer']!r}; rewrite it with "
                         "`python -m tokensieve.integrations.lmms_eval.scenes_task`")
    return sample.image


if __name__ == "__main__":
    print(f"wrote {write_questions()}")
