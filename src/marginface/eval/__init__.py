"""Evaluation: safe verification `.bin` pair sets, vectorised verification/identification metrics, running a
model over images (with per-image quality norms), and IJB-B/IJB-C scoring. Nothing here depends on the training stack.

Names load lazily so that `import marginface.eval` does not import torch until a model is run.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # pairs.py
    "PairSet": "marginface.eval.pairs",
    "load_pairs": "marginface.eval.pairs",
    "load_pair_sets": "marginface.eval.pairs",
    "save_pairs": "marginface.eval.pairs",
    # metrics.py
    "DEFAULT_FARS": "marginface.eval.metrics",
    "auc": "marginface.eval.metrics",
    "cmc": "marginface.eval.metrics",
    "eer": "marginface.eval.metrics",
    "kfold_accuracy": "marginface.eval.metrics",
    "pair_scores": "marginface.eval.metrics",
    "rank_k": "marginface.eval.metrics",
    "roc_curve": "marginface.eval.metrics",
    "threshold_at_far": "marginface.eval.metrics",
    "tar_at_far": "marginface.eval.metrics",
    "tpir_at_fpir": "marginface.eval.metrics",
    "val_at_far": "marginface.eval.metrics",
    "xnorm": "marginface.eval.metrics",
    # embed.py
    "embed_images": "marginface.eval.embed",
    "embed_images_separate": "marginface.eval.embed",
    # quality.py
    "QUALITY_HEADER": "marginface.eval.quality",
    "check_quality_path": "marginface.eval.quality",
    "write_quality_scores": "marginface.eval.quality",
    # verification.py
    "evaluate_pairs": "marginface.eval.verification",
    "verification_table": "marginface.eval.verification",
    "supported_fars": "marginface.eval.verification",
    # ijb.py
    "IJBMeta": "marginface.eval.ijb",
    "read_ijb_meta": "marginface.eval.ijb",
    "combine_image_features": "marginface.eval.ijb",
    "template_features": "marginface.eval.ijb",
    "score_template_pairs": "marginface.eval.ijb",
    "pair_refiner": "marginface.eval.ijb",
    "ijb_image_features": "marginface.eval.ijb",
    "ijb_verification": "marginface.eval.ijb",
    "ijb_identification": "marginface.eval.ijb",
    "evaluate_ijb": "marginface.eval.ijb",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'marginface.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
