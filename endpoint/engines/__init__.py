"""Engines run tasks for the endpoint daemon: ``thread`` and ``process`` on one host."""

from .base import Engine, TaskSpec, make_engine

__all__ = ["Engine", "TaskSpec", "make_engine"]
