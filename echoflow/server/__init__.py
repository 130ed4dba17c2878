"""EchoFlow server."""
