"""The `tokensieve_scenes` task's functions (lmms-eval loads this file beside the task's YAML)."""
from tokensieve.integrations.lmms_eval.scenes_task import QUESTIONS_FILE as _FILE
from tokensieve.integrations.lmms_eval.scenes_task import image_of

QUESTIONS_FILE = str(_FILE)  # the YAML's data file, an absolute path wherever the package is installed


def doc_to_visual(doc):
    return [image_of(doc).convert("RGB")]


def doc_to_text(doc):
    """The question alone: the model's chat template adds the image and its own framing."""
    return doc["question"]


def process_results(doc, results):
    """Exact match of the first generated word with the one-word answer."""
    words = results[0].strip().split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}
