"""EchoFlow: federated, privacy-audited synthetic echocardiography."""

from echoflow.errors import EchoFlowError

__all__ = ["EchoFlowError"]
__version__ = "0.1.0"
