"""Training data: MXNet RecordIO, image folders and list files, transforms, 5-point alignment and sampling.

Names load lazily so that `import marginface.data` stays cheap (no torch until a dataset is opened).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_dataset": "marginface.data.dataset",
    "FaceDataset": "marginface.data.dataset",
    "align": "marginface.data.align",
    "estimate_similarity": "marginface.data.align",
    "arcface_template": "marginface.data.align",
    "ARCFACE_TEMPLATE": "marginface.data.align",
    "RecordIOWriter": "marginface.data.recordio",
    "RecordIOReader": "marginface.data.recordio",
    "write_identity_dataset": "marginface.data.recordio",
    "pack_header": "marginface.data.recordio",
    "unpack_header": "marginface.data.recordio",
    "DistributedIdentitySampler": "marginface.data.sampler",
    "pack_dataset": "marginface.data.pack",
    "inspect_dataset": "marginface.data.inspect",
}

__all__ = sorted([*_EXPORTS, "synthetic"])

# The function `align` shares its name with the submodule `marginface.data.align`; importing the submodule
# binds the module to the package attribute, so bind the function right after (align needs only numpy).
from marginface.data.align import ARCFACE_TEMPLATE as ARCFACE_TEMPLATE  # noqa: E402
from marginface.data.align import align as align  # noqa: E402
from marginface.data.align import arcface_template as arcface_template  # noqa: E402
from marginface.data.align import estimate_similarity as estimate_similarity  # noqa: E402


def synthetic(*args: Any, **kwargs: Any) -> Any:
    """Build the procedural synthetic face-identity set; see `marginface.data.synth.synthetic`."""
    from marginface.data.synth import synthetic as _synthetic

    return _synthetic(*args, **kwargs)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'marginface.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
