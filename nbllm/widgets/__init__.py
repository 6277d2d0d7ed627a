"""Live notebook views over the token stream (ipywidgets 8).

State lives in traitlets; drawing goes through ``nbllm.render``. Each widget
also has an HTML fallback for frontends without widgets (nbconvert, GitHub).
"""

from __future__ import annotations

from .chat import ChatWidget
from .distribution import DistributionView
from .inside import AttentionView, CompareView, LogitLensView, SurpriseView
from .stepper import StepperWidget
from .stream import StreamView
from .text import TextView

__all__ = [
    "StreamView",
    "TextView",
    "DistributionView",
    "StepperWidget",
    "ChatWidget",
    "LogitLensView",
    "AttentionView",
    "SurpriseView",
    "CompareView",
]
