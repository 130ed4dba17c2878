"""EchoFlow federation."""
