"""Loss tournaments: every margin trained under one config for each seed (paired), with bootstrap intervals."""

from marginface.compare.comparison import compare
from marginface.compare.plan import ComparisonPlan, make_plan
from marginface.compare.spec import MarginSpec, parse_margin, parse_margins

__all__ = ["ComparisonPlan", "MarginSpec", "compare", "make_plan", "parse_margin", "parse_margins"]
