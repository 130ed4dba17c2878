"""EchoFlow models."""
