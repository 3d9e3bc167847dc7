"""Federated strategies built on Flower's."""

from fedspatial.strategies.fedavg import SpatialFedAvg
from fedspatial.strategies.privacy import (
    PrivacyBudgetGuard,
    PrivacyBudgetStop,
    central_dp,
    central_dp_epsilon,
)

__all__ = ["PrivacyBudgetGuard", "PrivacyBudgetStop", "SpatialFedAvg", "central_dp", "central_dp_epsilon"]
