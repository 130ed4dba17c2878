"""EchoFlow clients."""
