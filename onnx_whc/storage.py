"""Writing models whose weights do not fit one protobuf (2 GB) without copying or changing them.

`onnx.save(..., save_as_external_data=True)` moves the weights out of the model it is given,
and putting them back costs a second copy (protobuf frees a field's memory only with its whole
message). Here the weights go to the data file one tensor at a time, and a weightless copy of
the model that points at them is saved beside it.
"""

from __future__ import annotations

import os
from typing import Callable

import onnx
from google.protobuf.message import EncodeError, Message

PROTO_LIMIT = 2_000_000_000  # protobuf cannot serialise 2 GiB; stay clear of it
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the model, as onnx does
_PAGE = 4096  # page-aligned offsets let ONNX Runtime map large weights straight from the file
_PAGE_ALIGN_MIN_BYTES = 1 << 20


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model serialises as one message; the weights are measured one by one first,
    because protobuf refuses even to measure a message over 2 GiB."""
    if sum(t.ByteSize() for t in model.graph.initializer) >= PROTO_LIMIT:
        return False
    try:
        return model.ByteSize() < PROTO_LIMIT
    except EncodeError:
        return False


def save_external(model: onnx.ModelProto, path: str, location: str) -> None:
    """Save `model` to `path` with its large weights in `location` (a file name beside it)."""
    skeleton = onnx.ModelProto()
    copy_fields(skeleton, model, lambda field: field.name != "graph")
    copy_fields(skeleton.graph, model.graph, lambda field: field.name != "initializer")
    with open(os.path.join(os.path.dirname(path), location), "wb") as data:
        for tensor in model.graph.initializer:
            stub = skeleton.graph.initializer.add()
            if not tensor.HasField("raw_data") or tensor.ByteSize() < _EXTERNAL_MIN_BYTES:
                stub.CopyFrom(tensor)
                continue
            raw = tensor.raw_data  # one tensor's bytes at a time
            if len(raw) >= _PAGE_ALIGN_MIN_BYTES:
                data.write(b"\0" * (-data.tell() % _PAGE))
            offset = data.tell()
            data.write(raw)
            stub.name, stub.data_type, stub.doc_string = tensor.name, tensor.data_type, tensor.doc_string
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, str(value)
            del raw
    onnx.save(skeleton, path)


def copy_fields(target: Message, source: Message, keep: Callable) -> None:
    """Copy the set fields of `source` for which `keep(field descriptor)` holds into `target`."""
    for field, value in source.ListFields():
        if not keep(field):
            continue
        destination = getattr(target, field.name)
        if hasattr(destination, "extend"):
            destination.extend(value)
        elif hasattr(destination, "CopyFrom"):
            destination.CopyFrom(value)
        else:
            setattr(target, field.name, value)
