"""EchoFlow audit."""
