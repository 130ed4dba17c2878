"""Running a federation: the shared protocol and task contract, Hydra config -> run config, simulation on Ray.

- `protocol`: message actions and keys both `echoflow.clients` and `echoflow.server` use (they never import each
  other); `task`: the `SiteTask` contract and the weights' wire naming.
- `config`: the Hydra config as Flower run config; `simulation`: sites on Flower's simulation engine (Ray, local
  or cluster); `federate`: one stage or the stages in pipeline order; `echo_task`: the EchoFlow stages as a site task.
"""
