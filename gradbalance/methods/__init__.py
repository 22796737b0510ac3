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
from gradbalance.methods.config import ConFIG
from gradbalance.methods.db_mtl import DBMTL
from gradbalance.methods.dualproj import DualProj
from gradbalance.methods.dwa import DWA
from gradbalance.methods.fairgrad import FairGrad
from gradbalance.methods.famo import FAMO
from gradbalance.methods.gls import GLS
from gradbalance.methods.graddrop import GradDrop
from gradbalance.methods.gradnorm import GradNorm
from gradbalance.methods.gradvac import GradVac
from gradbalance.methods.imtl import IMTLG
from gradbalance.methods.imtl_hybrid import IMTL
from gradbalance.methods.linear import Mean, Sum
from gradbalance.methods.mgda import MGDA
from gradbalance.methods.nash_mtl import NashMTL
from gradbalance.methods.pcgrad import PCGrad
from gradbalance.methods.rlw import RLW
from gradbalance.methods.stch import STCH
from gradbalance.methods.uncertainty import UW
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
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "FAMO",
    "FairGrad",
    "GLS",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "IMTL",
    "IMTLG",
    "MGDA",
    "Mean",
    "NashMTL",
    "PCGrad",
    "RLW",
    "STCH",
    "Sum",
    "UPGrad",
    "UW",
]
