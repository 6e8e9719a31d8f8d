"""The Parsl engines' former module, kept so that code outside this repository importing
``tether.endpoint.engines.parsl_engine`` still works; they live in the package
``tether.endpoint.engines.parsl`` (one module per idea)."""

from .parsl.config import validate_engine
from .parsl.engine import HtexEngine, MPIEngine, ParslEngine
from .parsl.worker import control_file, run_in_worker

__all__ = ["HtexEngine", "MPIEngine", "ParslEngine", "control_file", "run_in_worker", "validate_engine"]
