"""Sites: the Flower ClientApp, the site-owned DP policy, patient-level DP-SGD with one ledger for the run."""

from echoflow.clients.app import make_client_app
from echoflow.clients.dp import PrivacyLedger, make_private, poisson_batches
from echoflow.clients.policy import PolicyRefusal, SitePolicy
from echoflow.clients.settings import ClientSettings
from echoflow.clients.site import RoundResult, evaluate, train_round
from echoflow.clients.task import SiteTask, group_arrays, load_group_arrays, load_task

__all__ = [
    "ClientSettings",
    "PolicyRefusal",
    "PrivacyLedger",
    "RoundResult",
    "SitePolicy",
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
