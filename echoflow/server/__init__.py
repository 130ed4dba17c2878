"""The federation's server: what the aggregator does each round.

`app` (ServerApp), `loop` (resumable round loop), `gather` + `roster` (sampling, roll call, faults), `screening`
(update checks), `strategies`, `secagg` (SecAgg+), `checkpoint` (round state), `latent_scale`, `tracking` (MLflow).
"""
