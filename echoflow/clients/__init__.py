"""Sites: the Flower ClientApp, per-site DP-SGD with a whole-run privacy ledger, and the task contract."""

from echoflow.clients.app import make_client_app
from echoflow.clients.dp import DPConfig, PrivacyLedger, make_private, poisson_batches
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import RoundResult, evaluate, train_round
from echoflow.federation.task import SiteTask, group_arrays, load_group_arrays, load_task

__all__ = [
    "ClientSettings",
    "DPConfig",
    "PrivacyLedger",
    "RoundResult",
    "SiteTask",
    "evaluate",
    "group_arrays",
    "load_group_arrays",
    "load_task",
    "make_client_app",
    "make_private",
    "poisson_batches",
    "train_round",
]
