"""Sites: the Flower ClientApp and what a site does in a round.

`app` (ClientApp), `site` (train / evaluate a round), `dp` + `dp_engine` (DP-SGD, whole-run privacy ledger),
`secagg` (SecAgg+), `settings` (per-site settings), `faults` (fault injection for test and soak simulations).
"""
