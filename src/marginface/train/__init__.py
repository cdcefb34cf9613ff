"""Training: validated configs, the loop from one CPU to many GPUs, checkpoints with exact resume, reports."""

from marginface.train.config import Config, load_config
from marginface.train.trainer import train

__all__ = ["Config", "load_config", "train"]
