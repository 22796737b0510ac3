"""Balancing methods, one per module. ``gradbalance.available_methods()`` lists the names."""

from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    available_methods,
    make_method,
    register,
)
from gradbalance.methods.linear import Mean, Sum
from gradbalance.methods.mgda import MGDA

__all__ = [
    "Aggregation",
    "Method",
    "TaskInputs",
    "available_methods",
    "make_method",
    "register",
    "Mean",
    "MGDA",
    "Sum",
]
