"""Federated strategies built on Flower's."""

from fedspatial.strategies.fedavg import SpatialFedAvg
from fedspatial.strategies.privacy import (
    PrivacyBudgetGuard,
    PrivacyBudgetStop,
    central_dp,
    central_dp_epsilon,
)
from fedspatial.strategies.registry import STRATEGY_CLASSES, build_strategy, check_strategy

__all__ = [
    "STRATEGY_CLASSES",
    "PrivacyBudgetGuard",
    "PrivacyBudgetStop",
    "SpatialFedAvg",
    "build_strategy",
    "central_dp",
    "central_dp_epsilon",
    "check_strategy",
]
