"""Balancing methods, one per module. ``gradbalance.available_methods()`` lists the names."""

from gradbalance.methods.aligned_mtl import AlignedMTL
from gradbalance.methods.base import (
    Aggregation,
    Method,
    TaskInputs,
    available_methods,
    make_method,
    register,
)
from gradbalance.methods.cagrad import CAGrad
from gradbalance.methods.dualproj import DualProj
from gradbalance.methods.imtl import IMTLG
from gradbalance.methods.imtl_hybrid import IMTL
from gradbalance.methods.linear import Mean, Sum
from gradbalance.methods.nash_mtl import NashMTL
from gradbalance.methods.upgrad import UPGrad

__all__ = [
    "Aggregation",
    "Method",
    "TaskInputs",
    "available_methods",
    "make_method",
    "register",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "IMTL",
    "IMTLG",
    "Mean",
    "NashMTL",
    "Sum",
    "UPGrad",
]
