"""Pure codec for :mod:`pipeline.messages`: ``encode(msg) -> list[bytes]``, ``decode(frames) -> msg``.

Wire format (one ZeroMQ multipart message):

- frame 0: header = ``VERSION`` byte, type-id byte, then UTF-8 JSON of the
  message's scalar fields. Array fields appear in the JSON as
  ``{"$a": i, "dtype": "<f4", "shape": [n, 4]}`` where ``i`` indexes the
  buffer frames that follow; nested message dataclasses as
  ``{"$m": type_id, ...fields}``; tuples of them as JSON lists.
- frames 1..k: the raw, C-contiguous bytes of each array (zero-copy on send
  for contiguous arrays).

:class:`~pipeline.messages.FrameRef`, sent once per frame, has a fixed layout
instead of JSON (about 10x cheaper to encode and decode): after the two bytes,
``struct`` ``<qqqqiiHHB`` = slot, seq, frame_index, captured_at_ns, height,
width, the byte lengths of the UTF-8 camera and ring names, a flags byte
(bit 0: ``replay``), followed by the two names. (Version 1 had no flags byte.)

Nothing is pickled: decoding only builds the registered dataclasses from
JSON scalars and ``numpy.frombuffer``. A message that does not decode raises
:class:`MalformedMessage`; receivers count it as a ``malformed`` drop and
keep running.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from pipeline import messages as m

VERSION = 2

#: Type ids on the wire. Append only; never renumber.
TYPES: dict[int, type] = {
    1: m.FrameRef,
    2: m.Detections,
    3: m.TrackUpdate,
    4: m.EmbeddingRecord,
    5: m.StageStats,
    6: m.StatusRequest,
    7: m.StageStatus,
    8: m.StatusReply,
    9: m.ScaleRequest,
    10: m.Ack,
    11: m.Credit,
    12: m.CreditAck,
    13: m.StorageItem,
    14: m.StorageAck,
    15: m.LiveTracks,
}
_IDS: dict[type, int] = {t: i for i, t in TYPES.items()}
_FRAME_REF = struct.Struct("<qqqqiiHHB")
_FRAME_REF_ID = _IDS[m.FrameRef]
_ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_))


class MalformedMessage(ValueError):
    """A multipart message that is not a valid FacePro message (wrong version, type, JSON, buffers)."""


def _pack(value: Any, buffers: list[Any]) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
        return {"$a": len(buffers) - 1, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"$m": _IDS[type(value)]}
        for f in dataclasses.fields(value):
            out[f.name] = _pack(getattr(value, f.name), buffers)
        return out
    if isinstance(value, tuple):
        return [_pack(v, buffers) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def encode(msg: object) -> list[Any]:
    """Encode a message dataclass into multipart frames (``bytes`` / ``memoryview``).

    Raises:
        TypeError: ``msg`` is not a registered message type.
    """
    type_id = _IDS.get(type(msg))
    if type_id is None:
        raise TypeError(f"not a registered message type: {type(msg).__name__}")
    if type_id == _FRAME_REF_ID:
        return [_encode_frame_ref(msg)]  # type: ignore[arg-type]
    buffers: list[Any] = []
    tree = _pack(msg, buffers)
    header = bytes((VERSION, type_id)) + json.dumps(tree, separators=(",", ":")).encode()
    return [header, *buffers]


def _encode_frame_ref(ref: m.FrameRef) -> bytes:
    camera, ring = ref.camera.encode(), ref.ring.encode()
    fixed = _FRAME_REF.pack(ref.slot, ref.seq, ref.frame_index, ref.captured_at_ns, ref.height, ref.width,
                            len(camera), len(ring), 1 if ref.replay else 0)
    return bytes((VERSION, _FRAME_REF_ID)) + fixed + camera + ring


def _decode_frame_ref(header: bytes) -> m.FrameRef:
    body = header[2:]
    if len(body) < _FRAME_REF.size:
        raise MalformedMessage(f"FrameRef: {len(body)} bytes, expected at least {_FRAME_REF.size}")
    slot, seq, index, captured, height, width, n_cam, n_ring, flags = _FRAME_REF.unpack_from(body)
    if len(body) != _FRAME_REF.size + n_cam + n_ring:
        raise MalformedMessage(f"FrameRef: {len(body)} bytes do not match name lengths {n_cam} + {n_ring}")
    names = body[_FRAME_REF.size:]
    try:
        return m.FrameRef(camera=names[:n_cam].decode(), ring=names[n_cam:].decode(), slot=slot, seq=seq,
                          frame_index=index, captured_at_ns=captured, height=height, width=width,
                          replay=bool(flags & 1))
    except ValueError as err:  # UnicodeDecodeError included
        raise MalformedMessage(f"FrameRef: {err}") from None


def _array(spec: dict[str, Any], frames: list[Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    if dtype.str not in _ALLOWED_DTYPES:
        raise MalformedMessage(f"array dtype {dtype.str} not allowed")
    shape = tuple(int(s) for s in spec["shape"])
    buf = frames[1 + int(spec["$a"])]
    count = int(np.prod(shape)) if shape else 1
    if len(buf) != count * dtype.itemsize:
        raise MalformedMessage(f"array buffer of {len(buf)} bytes does not match shape {shape} {dtype.str}")
    # frombuffer on the received frame: read-only view, no copy.
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _unpack(value: Any, frames: list[Any]) -> Any:
    if isinstance(value, dict):
        if "$a" in value:
            return _array(value, frames)
        if "$m" in value:
            cls = TYPES.get(value["$m"])
            if cls is None:
                raise MalformedMessage(f"unknown nested type id {value['$m']}")
            kwargs = {k: _unpack(v, frames) for k, v in value.items() if k != "$m"}
            return cls(**kwargs)
        raise MalformedMessage("unexpected mapping in message")
    if isinstance(value, list):
        return tuple(_unpack(v, frames) for v in value)
    return value


def decode(frames: list[Any]) -> object:
    """Decode multipart frames produced by :func:`encode`.

    Args:
        frames: ``bytes``, ``memoryview`` or ``zmq.Frame`` buffers.

    Raises:
        MalformedMessage: anything wrong with the frames (never another exception type).
    """
    if not frames:
        raise MalformedMessage("empty message")
    bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    header = bytes(bufs[0])
    if len(header) < 3:
        raise MalformedMessage("header too short")
    if header[0] != VERSION:
        raise MalformedMessage(f"codec version {header[0]} not supported (expected {VERSION})")
    cls = TYPES.get(header[1])
    if cls is None:
        raise MalformedMessage(f"unknown message type id {header[1]}")
    if header[1] == _FRAME_REF_ID:
        return _decode_frame_ref(header)
    try:
        tree = json.loads(header[2:])
        if not isinstance(tree, dict) or tree.get("$m") != header[1]:
            raise MalformedMessage("header body does not match its type id")
        return _unpack(tree, bufs)
    except MalformedMessage:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise MalformedMessage(f"{cls.__name__}: {err}") from None
