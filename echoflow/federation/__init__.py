"""Running a federation: sites on Flower's simulation engine (Ray, local or cluster), stage sequencing."""

from echoflow.federation.config import run_config, run_config_toml, simulation_config
from echoflow.federation.pipeline import STAGE_ORDER, federate, stages_of
from echoflow.federation.simulation import SimulationConfig, simulate

__all__ = ["STAGE_ORDER", "SimulationConfig", "federate", "run_config", "run_config_toml", "simulate",
           "simulation_config", "stages_of"]
