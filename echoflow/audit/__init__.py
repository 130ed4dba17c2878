"""EchoFlow's privacy audit: exact-decision per-site indexes, calibrated τ, canaries, and the report."""

from echoflow.audit.bounded_ivf import BoundedIVFIndex
from echoflow.audit.calibrate import Calibration, calibrate
from echoflow.audit.canaries import TRANSFORMS, CanaryPlan, DCRStats, dcr_stats, plant_canaries
from echoflow.audit.decide import AuditFailedError, AuditResult, decide_samples, query_sites
from echoflow.audit.index import ExactIndex, build_index, load_index
from echoflow.audit.neighbours import Neighbours, Similarity, SiteIndex, SiteSearcher, prepare, threshold_recall
from echoflow.audit.report import build_report, log_to_mlflow, write_report

__all__ = [
    "TRANSFORMS",
    "AuditFailedError",
    "AuditResult",
    "BoundedIVFIndex",
    "Calibration",
    "CanaryPlan",
    "DCRStats",
    "ExactIndex",
    "Neighbours",
    "Similarity",
    "SiteIndex",
    "SiteSearcher",
    "build_index",
    "build_report",
    "calibrate",
    "dcr_stats",
    "decide_samples",
    "load_index",
    "log_to_mlflow",
    "plant_canaries",
    "prepare",
    "query_sites",
    "threshold_recall",
    "write_report",
]
