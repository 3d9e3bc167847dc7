"""FedAvg that keeps a per-round record of what each site reported and what was sent.

:class:`SpatialFedAvg` is also the base of every other strategy of
:mod:`fedspatial.strategies.registry`: ``class X(SpatialFedAvg, FlowerX)`` puts its
bookkeeping (history, resumed round numbers, partitioned keys, reproducible sampling)
in front of Flower's own aggregation rule, whose math stays Flower's.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedspatial.shared.protocol.names import RECEIVED_EVAL_LOSS


def _payload_bytes(messages: Iterable[Message]) -> int:
    total = 0
    for msg in messages:
        if msg.has_content():
            for record in msg.content.array_records.values():
                total += sum(len(a.data) for a in record.values())
    return total


def _scalar(record: MetricRecord | None, key: str) -> float | None:
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, int | float) else None


class _OrderedNodes:
    """A Grid's view whose ``get_node_ids`` lists the nodes in a fixed order (site names),
    so that seeded sampling picks the same sites whatever ids the SuperNodes got."""

    def __init__(self, grid: Grid, key: Callable[[int], Any]) -> None:
        self._grid = grid
        self._key = key

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=lambda n: (str(self._key(n)), n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SpatialFedAvg(FedAvg):
    """:class:`flwr.serverapp.strategy.FedAvg`, weighted by ``num-examples``, that also
    records per round: each site's train metrics, aggregated losses, bytes of model
    arrays sent and received, and wall time.

    Subclassed together with another Flower strategy (``class X(SpatialFedAvg, FedMedian)``)
    it adds the same bookkeeping to that strategy's aggregation rule.

    Parameters
    ----------
    round_offset : int (default: 0)
        Rounds already done before this ``start`` (when a run is resumed); added to the
        round number sent to sites and recorded in :attr:`history`.
    partitioned_keys : list of str (default: [])
        Arrays whose parts each belong to one site (e.g. per-batch decoder weights): the
        aggregate is the global array plus the *sum* of the sites' updates, so a part is
        what its owner trained, not an average diluted by sites that never touched it.
    partition_owners : mapping of node id to {key: boolean mask} (default: None)
        Which entries of each partitioned key a site owns. Given, only the owner's update
        of an entry counts (robust aggregation: one site must not write into the parts of
        the others); None: every site's update is summed (a site's update of a part it
        never sees is zero).
    sample_seed : int (default: None)
        With ``fraction_train < 1``: the seed of the sites sampled each round (the same
        sites for the same seed and round, resumed runs included); None: Python's global
        random state, as Flower does.
    node_order : callable (default: None)
        Key that orders the nodes before seeded sampling (e.g. the site's name).
    **kwargs
        Passed to the Flower strategy.
    """

    def __init__(
        self,
        *,
        round_offset: int = 0,
        partitioned_keys: list[str] | None = None,
        partition_owners: Mapping[int, Mapping[str, np.ndarray]] | None = None,
        sample_seed: int | None = None,
        node_order: Callable[[int], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if round_offset < 0:
            raise ValueError("round_offset must be >= 0")
        super().__init__(**kwargs)
        self.round_offset = round_offset
        self.partitioned_keys = list(partitioned_keys or [])
        self.partition_owners = partition_owners
        self.sample_seed = sample_seed
        self.node_order = node_order
        self._global: ArrayRecord | None = None
        self.history: list[dict[str, Any]] = []
        self._round_start = 0.0
        self._sent = 0

    def _entry(self, server_round: int) -> dict[str, Any]:
        r = server_round + self.round_offset
        if not self.history or self.history[-1]["round"] != r:
            self.history.append({"round": r, "sites": {}})
        return self.history[-1]

    @contextlib.contextmanager
    def _sampling(self, server_round: int) -> Iterator[None]:
        """Flower samples with the module-level ``random``: seed it for this round only
        and give the caller's random state back afterwards."""
        if self.sample_seed is None or self.fraction_train >= 1.0:
            yield
            return
        state = random.getstate()
        random.seed(f"fedspatial-sampling-{self.sample_seed}-{server_round + self.round_offset}")
        try:
            yield
        finally:
            random.setstate(state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._global = arrays
        view = cast(Grid, _OrderedNodes(grid, self.node_order)) if self.node_order is not None else grid
        with self._sampling(server_round):
            messages = list(super().configure_train(server_round, arrays, config, view))
        for msg in messages:  # FedAvg stamps the round of this start(); count resumed rounds too
            msg.content.config_records[self.configrecord_key]["server-round"] = server_round + self.round_offset
        self._sent = _payload_bytes(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # Read before aggregating: Flower's robust rules (FedMedian, FedTrimmedAvg, Bulyan)
        # take the arrays out of the replies as they go.
        received = _payload_bytes(replies)
        parts = self._partitioned_parts(replies)
        arrays, agg = super().aggregate_train(server_round, replies)
        if arrays is not None and self.partitioned_keys and self._global is not None:
            arrays = self._sum_updates(arrays, parts)
        entry = self._entry(server_round)
        for msg in replies:
            if msg.has_content() and "metrics" in msg.content:
                m = msg.content["metrics"]
                entry["sites"][str(msg.metadata.src_node_id)] = {
                    k: float(v) for k, v in m.items() if isinstance(v, int | float)
                }
            elif msg.has_error():
                entry.setdefault("errors", []).append(
                    {"node": msg.metadata.src_node_id, "error": msg.error.reason}
                )
        received_loss = _scalar(agg, RECEIVED_EVAL_LOSS)
        if received_loss is not None:  # the sites measured the model this round started from
            entry[RECEIVED_EVAL_LOSS] = received_loss
            previous = self.history[-2] if len(self.history) > 1 else None
            if previous is not None and previous["round"] == entry["round"] - 1 and previous.get("eval-loss") is None:
                previous["eval-loss"] = received_loss
        entry["bytes-sent"] = self._sent
        entry["bytes-received"] = received
        entry["train-loss"] = _scalar(agg, "train-loss")
        entry["n-sites"] = sum(1 for m in replies if m.has_content())
        entry["seconds"] = time.perf_counter() - self._round_start
        return arrays, agg

    def _partitioned_parts(self, replies: list[Message]) -> dict[int, dict[str, np.ndarray]]:
        """Each replying site's partitioned arrays (copies)."""
        parts: dict[int, dict[str, np.ndarray]] = {}
        if not self.partitioned_keys:
            return parts
        for msg in replies:
            if msg.has_content():
                record = msg.content.array_records[self.arrayrecord_key]
                parts[msg.metadata.src_node_id] = {key: record[key].numpy() for key in self.partitioned_keys if key in record}
        return parts

    def _sum_updates(self, arrays: ArrayRecord, parts: dict[int, dict[str, np.ndarray]]) -> ArrayRecord:
        assert self._global is not None
        out = dict(arrays.items())
        for key in self.partitioned_keys:
            if key not in self._global:
                raise KeyError(f"partitioned key {key!r} is not a model array")
            base = self._global[key].numpy()
            total = base.copy()
            for node, sent in parts.items():
                update = sent[key] - base
                if self.partition_owners is not None:
                    owned = self.partition_owners.get(node, {}).get(key)
                    update = np.where(owned, update, 0.0) if owned is not None else np.zeros_like(update)
                total += update
            out[key] = Array(total)
        return ArrayRecord(out)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        agg = super().aggregate_evaluate(server_round, replies)
        entry = self._entry(server_round)
        entry["eval-loss"] = _scalar(agg, "eval-loss")
        entry["seconds"] = time.perf_counter() - self._round_start
        return agg
