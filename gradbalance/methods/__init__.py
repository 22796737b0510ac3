"""Balancing methods, one per module. ``gradbalance.available_methods()`` lists the names."""

from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    available_methods,
    make_method,
    register,
)
from gradbalance.methods.dwa import DWA
from gradbalance.methods.gradnorm import GradNorm
from gradbalance.methods.linear import Mean, Sum
from gradbalance.methods.pcgrad import PCGrad
from gradbalance.methods.rlw import RLW
from gradbalance.methods.uncertainty import UW

__all__ = [
    "DWA",
    "RLW",
    "UW",
    "Aggregation",
    "GradNorm",
    "Mean",
    "Method",
    "PCGrad",
    "Sum",
    "TaskInputs",
    "available_methods",
    "make_method",
    "register",
]
