"""Sites: the Flower ClientApp and what a site does in a round.

`app` (ClientApp), `site` (train / evaluate a round), `policy` (the site's own DP policy, refusals), `dp` +
`dp_engine` (patient-level DP-SGD, one privacy ledger for the whole run, split over stages),
`secagg` (SecAgg+), `settings` (per-site settings), `faults` (fault injection for test and soak simulations).
"""
