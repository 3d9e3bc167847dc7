"""Federated strategies built on Flower's."""

from fedspatial.strategies.fedavg import SpatialFedAvg

__all__ = ["SpatialFedAvg"]
