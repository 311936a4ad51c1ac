"""tokensieve as an lmms-eval model (`--model tokensieve`), its local task and `tokensieve eval`.

Needs the extra: `pip install "tokensieve[lmms-eval]"`. The model is registered through the
`lmms_eval.models` entry point (`manifests` below); `TASKS_DIR` holds the `tokensieve_scenes` task
for `--include_path`. See docs/lmms-eval.md.
"""
from pathlib import Path

MODEL_NAME = "tokensieve"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifests():
    """The entry point lmms-eval reads: the `tokensieve` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path="tokensieve.integrations.lmms_eval.model.TokenSieve")]
