"""The public names of `marginface.data` resolve to the right objects, lazily."""

from __future__ import annotations

import subprocess
import sys

import marginface as mf


def test_exports():
    names = [
        "open_dataset",
        "align",
        "estimate_similarity",
        "ARCFACE_TEMPLATE",
        "RecordIOWriter",
        "write_identity_dataset",
        "DistributedIdentitySampler",
        "synthetic",
    ]
    for name in names:
        assert hasattr(mf.data, name), name
    assert callable(mf.data.align) and mf.data.align.__module__ == "marginface.data.align"
    assert mf.data.ARCFACE_TEMPLATE.shape == (5, 2)


def test_import_is_light():
    # Importing the package and the pack/inspect tools must not pull in torch (seconds to import).
    code = (
        "import sys, marginface.data, marginface.data.pack, marginface.data.inspect, marginface.cli.data; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
