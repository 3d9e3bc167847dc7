"""The one conversion between :class:`~fedspatial.shared.protocol.payload.Payload`
and Flower's records, used by the ServerApp and the ClientApp alike.

A payload travels as a RecordDict with up to three records: ``arrays`` (ArrayRecord),
``config`` (ConfigRecord) and ``metrics`` (MetricRecord).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspatial.shared.protocol.payload import ConfigValue, Payload

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_recorddict(payload: Payload) -> RecordDict:
    """``payload`` as a message's content; empty parts are left out (a ConfigRecord
    cannot hold an empty list, so such entries are dropped: readers treat a missing
    list as empty)."""
    content = RecordDict()
    if payload.arrays:
        content[ARRAYS] = arrays_record(payload.arrays)
    config = {k: v for k, v in payload.config.items() if not (isinstance(v, list) and not v)}
    if config:
        content[CONFIG] = ConfigRecord(config)  # type: ignore[arg-type]  # ConfigValue is ConfigRecord's value type
    content[METRICS] = MetricRecord(dict(payload.metrics))  # type: ignore[arg-type]
    return content


def from_recorddict(content: RecordDict) -> Payload:
    """Inverse of :func:`to_recorddict` (records under other names are ignored)."""
    arrays = record_arrays(content.array_records[ARRAYS]) if ARRAYS in content.array_records else {}
    config: dict[str, ConfigValue] = dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {}  # type: ignore[arg-type]
    metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
    return Payload(arrays, config, {k: v for k, v in metrics.items() if isinstance(v, int | float)})
