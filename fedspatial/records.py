"""The one conversion between :class:`~fedspatial.shared.protocol.payload.Payload`
and Flower's records, used by the ServerApp and the ClientApp alike.

A payload travels as a RecordDict with up to three records: ``arrays`` (ArrayRecord),
``config`` (ConfigRecord) and ``metrics`` (MetricRecord).

Flower 1.42 moves every array of a message as two separate objects (the array and its
chunk), each one request at every hop: ServerApp -> SuperLink -> SuperNode -> ClientApp
and back, every request a few database operations at the SuperLink. A query's arrays are
therefore packed into one byte array (``packed``; its ``layout`` in a ConfigRecord of the
same name), so that a k-means step with a dozen small arrays costs two objects, not two
dozen. A training message's model is packed by the server's grid for the journey only
(:func:`pack_content`, :func:`unpack_content`): Flower's strategies see and aggregate
the arrays one by one, as always.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspatial.shared.protocol.payload import ConfigValue, Payload

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
PACKED, LAYOUT = "packed", "layout"
RIDERS = "riders"
"""ConfigRecord of a request carrying later requests (:func:`rider_prefix`): their queries."""
RIDER_ERROR = "error"
"""ConfigRecord, under a rider's prefix, of a rider the site did not answer (``reason``)."""


def rider_prefix(i: int) -> str:
    return f"rider{i}."


def _contiguous(value: np.ndarray) -> np.ndarray:
    """``value`` in C order (not ``np.ascontiguousarray``: it makes a 0-d array 1-d)."""
    value = np.asarray(value)
    return value if value.flags.c_contiguous else value.copy(order="C")


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(_contiguous(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """All ``arrays`` as one uint8 array, and the JSON layout that :func:`unpack_arrays`
    reads them back with (name, dtype, shape, byte offset, for each)."""
    parts, layout, offset = [], [], 0
    for name, value in arrays.items():
        value = _contiguous(value)
        if value.dtype.hasobject:
            raise TypeError(f"array {name!r} holds Python objects: a message carries numbers or fixed-width strings")
        parts.append(value.reshape(-1).view(np.uint8))
        layout.append([name, value.dtype.str, list(value.shape), offset])
        offset += value.nbytes
    packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return packed, json.dumps(layout)


def unpack_arrays(packed: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays` (each array a copy that owns its memory)."""
    raw = np.ascontiguousarray(packed, dtype=np.uint8)
    out = {}
    for name, dtype, shape, offset in json.loads(layout):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = raw[offset: offset + count * dt.itemsize].view(dt).reshape(shape).copy()
    return out


def _put_packed(content: RecordDict, arrays: Mapping[str, np.ndarray], prefix: str = "") -> None:
    packed, layout = pack_arrays(arrays)
    content[prefix + ARRAYS] = ArrayRecord({PACKED: Array(packed)})
    content[prefix + LAYOUT] = ConfigRecord({LAYOUT: layout})


def _unpacked(content: RecordDict, prefix: str = "") -> dict[str, np.ndarray] | None:
    """The arrays packed under ``prefix``, or None when none are."""
    record, layout = content.array_records.get(prefix + ARRAYS), content.config_records.get(prefix + LAYOUT)
    if record is None or layout is None or set(record.keys()) != {PACKED}:
        return None
    return unpack_arrays(record[PACKED].numpy(), str(layout[LAYOUT]))


def to_recorddict(payload: Payload, *, pack: bool = True) -> RecordDict:
    """``payload`` as a message's content; empty parts are left out (a ConfigRecord
    cannot hold an empty list, so such entries are dropped: readers treat a missing
    list as empty). ``pack``: send the arrays as one (see the module docstring); False
    for the model arrays a Flower strategy aggregates."""
    content = RecordDict()
    if payload.arrays and pack and len(payload.arrays) > 1:
        _put_packed(content, payload.arrays)
    elif payload.arrays:
        content[ARRAYS] = arrays_record(payload.arrays)
    config = {k: v for k, v in payload.config.items() if not (isinstance(v, list) and not v)}
    if config:
        content[CONFIG] = ConfigRecord(config)  # type: ignore[arg-type]  # ConfigValue is ConfigRecord's value type
    content[METRICS] = MetricRecord(dict(payload.metrics))  # type: ignore[arg-type]
    return content


def from_recorddict(content: RecordDict) -> Payload:
    """Inverse of :func:`to_recorddict` (records under other names are ignored)."""
    arrays = _unpacked(content)
    if arrays is None:
        arrays = record_arrays(content.array_records[ARRAYS]) if ARRAYS in content.array_records else {}
    config: dict[str, ConfigValue] = dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {}  # type: ignore[arg-type]
    metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
    return Payload(arrays, config, {k: v for k, v in metrics.items() if isinstance(v, int | float)})


def pack_content(content: RecordDict) -> bool:
    """Pack the ``arrays`` record of a message's ``content`` in place (as
    :func:`to_recorddict` does); False when there was nothing to pack."""
    record = content.array_records.get(ARRAYS)
    if record is None or len(record) < 2 or LAYOUT in content.config_records:
        return False
    _put_packed(content, record_arrays(record))
    return True


def unpack_content(content: RecordDict) -> None:
    """Undo :func:`pack_content` (or a packed :func:`to_recorddict`) in place, for the
    payload itself and for every payload :func:`nest`-ed in it."""
    for name in [n for n in content.config_records if n == LAYOUT or n.endswith("." + LAYOUT)]:
        prefix = name[: -len(LAYOUT)]
        arrays = _unpacked(content, prefix)
        if arrays is not None:
            content[prefix + ARRAYS] = arrays_record(arrays)
            del content[name]


def is_packed(content: RecordDict) -> bool:
    return LAYOUT in content.config_records


def nest(content: RecordDict, prefix: str, inner: RecordDict) -> None:
    """Carry the records of ``inner`` in ``content`` under ``prefix`` (e.g. ``rider0.``):
    one message, several payloads (:func:`unnest` takes them out again)."""
    for name, record in inner.items():
        content[prefix + name] = record


def unnest(content: RecordDict, prefix: str) -> RecordDict:
    return RecordDict({name[len(prefix):]: record for name, record in content.items() if name.startswith(prefix)})
