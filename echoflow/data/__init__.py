"""EchoFlow data."""
