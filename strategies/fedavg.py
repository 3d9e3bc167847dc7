"""FedAvg that keeps a per-round record of what each site reported and what was sent."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


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


class SpatialFedAvg(FedAvg):
    """:class:`flwr.serverapp.strategy.FedAvg`, weighted by ``num-examples``, that also
    records per round: each site's train metrics, aggregated losses, bytes of model
    arrays sent and received, and wall time.

    Parameters
    ----------
    round_offset : int (default: 0)
        Rounds already done before this ``start`` (when a run is resumed); added to the
        round number sent to sites and recorded in :attr:`history`.
    partitioned_keys : list of str (default: [])
        Arrays whose parts each belong to one site (e.g. per-batch decoder weights): the
        aggregate is the global array plus the *sum* of the sites' updates, so a part is
        what its owner trained, not an average diluted by sites that never touched it.
    **kwargs
        Passed to :class:`~flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, round_offset: int = 0, partitioned_keys: list[str] | None = None, **kwargs: Any) -> None:
        if round_offset < 0:
            raise ValueError("round_offset must be >= 0")
        super().__init__(**kwargs)
        self.round_offset = round_offset
        self.partitioned_keys = list(partitioned_keys or [])
        self._global: ArrayRecord | None = None
        self.history: list[dict[str, Any]] = []
        self._round_start = 0.0
        self._sent = 0

    def _entry(self, server_round: int) -> dict[str, Any]:
        r = server_round + self.round_offset
        if not self.history or self.history[-1]["round"] != r:
            self.history.append({"round": r, "sites": {}})
        return self.history[-1]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._global = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:  # FedAvg stamps the round of this start(); count resumed rounds too
            msg.content.config_records[self.configrecord_key]["server-round"] = server_round + self.round_offset
        self._sent = _payload_bytes(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, agg = super().aggregate_train(server_round, replies)
        if arrays is not None and self.partitioned_keys and self._global is not None:
            arrays = self._sum_updates(arrays, replies)
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
        entry["bytes-sent"] = self._sent
        entry["bytes-received"] = _payload_bytes(replies)
        entry["train-loss"] = _scalar(agg, "train-loss")
        entry["n-sites"] = sum(1 for m in replies if m.has_content())
        entry["seconds"] = time.perf_counter() - self._round_start
        return arrays, agg

    def _sum_updates(self, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        assert self._global is not None
        out = dict(arrays.items())
        for key in self.partitioned_keys:
            if key not in self._global:
                raise KeyError(f"partitioned key {key!r} is not a model array")
            base = self._global[key].numpy()
            total = base.copy()
            for msg in replies:
                if msg.has_content():
                    total += msg.content.array_records[self.arrayrecord_key][key].numpy() - base
            out[key] = Array(total)
        return ArrayRecord(out)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        agg = super().aggregate_evaluate(server_round, replies)
        entry = self._entry(server_round)
        entry["eval-loss"] = _scalar(agg, "eval-loss")
        entry["seconds"] = time.perf_counter() - self._round_start
        return agg
