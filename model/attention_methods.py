"""The attention maps that model/attention.py computes and the ways it fuses heads, by name.

Without torch, so that a server process that never runs the model (a front end of the model process)
checks a request's method against them.
"""

from typing import Literal, get_args

HeadFusion = Literal["mean", "max", "min"]
Method = Literal["raw", "last", "rollout", "gradient", "threshold"]
HEAD_FUSIONS = get_args(HeadFusion)
METHODS = get_args(Method)
