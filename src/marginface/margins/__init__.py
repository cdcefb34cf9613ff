"""Margins: pure, device-agnostic transforms from cosines to scaled logits in the unified T/N/G form."""

from marginface.margins import adaptive, additive, mining, search_space  # noqa: F401  (registers the margins)
from marginface.margins.base import Margin, RowContext
from marginface.margins.registry import available, create, parameters

__all__ = ["Margin", "RowContext", "available", "create", "parameters"]
