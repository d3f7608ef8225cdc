"""Callbacks, one job each: writing predictions, writing reports, freezing a pretrained backbone."""

from sedense.callbacks.finetuning import FreezeBackbone
from sedense.callbacks.prediction import PredictionWriter
from sedense.callbacks.reporting import ReportWriter

__all__ = ["FreezeBackbone", "PredictionWriter", "ReportWriter"]
