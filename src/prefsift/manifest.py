"""The reproducibility record every stage writes beside its output: what ran, on what, with which versions."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    import prefsift

    return {"prefsift": prefsift.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "datasets": datasets.__version__,
            "python": platform.python_version()}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and chat template: log-probs from another tokenizer are not comparable."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(tokenizer.eos_token).encode())
    return digest.hexdigest()[:16]


def write_manifest(out_dir: Path, stage: str, record: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.json"
    full = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record, "versions": versions()}
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    from prefsift.errors import PrefsiftError

    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise PrefsiftError(f"no manifest.json in {directory}: is it a prefsift output directory?")
    return json.loads(path.read_text())
