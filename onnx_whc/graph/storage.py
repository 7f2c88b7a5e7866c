"""Files: atomic saving and copying, the input's external data, and models over protobuf's 2 GB.

Models whose weights do not fit one protobuf (2 GB) are written without copying or changing them.

`onnx.save(..., save_as_external_data=True)` moves the weights out of the model it is given,
and putting them back costs a second copy (protobuf frees a field's memory only with its whole
message). Here the weights go to the data file one tensor at a time, and a weightless copy of
the model that points at them is saved beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable

import onnx
from google.protobuf.message import EncodeError, Message

from ..errors import UserInputError

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


def external_location_problem(folder: str, location: str) -> str | None:
    """Why an external data `location` of a model in `folder` is not a file inside that folder, or None.

    onnx (>= 1.16) refuses such locations; checking them first turns its refusal into a clear
    message and never lets a model name a file elsewhere (`../secret.bin`, `/etc/passwd`, a link).
    """
    if "\0" in location:
        return "is not a file name"
    if os.path.isabs(location):
        return "is an absolute path, not a file inside the model's folder"
    if os.path.normpath(location).split(os.sep)[0] == os.pardir:
        return "lies outside the model's folder"
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(os.path.join(folder, location))]) != real_folder:
        return "lies outside the model's folder (through a symbolic link)"
    return None


@contextmanager
def _staging(folder: str):
    staging = tempfile.mkdtemp(prefix=".onnx-whc-", dir=folder)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save(model: onnx.ModelProto, path: str) -> None:
    """Write atomically: a temporary file in the target folder, then a rename.

    Models over 2 GB keep their weights in `<name>.data` beside the model.
    """
    path = os.path.abspath(path)
    folder = check_writable("-o", path)
    large = _has_external(model) or not fits_protobuf(model)
    data_name = os.path.basename(path) + ".data"
    try:
        with _staging(folder) as staging:
            staged = os.path.join(staging, os.path.basename(path))
            if large:
                save_external(model, staged, data_name)  # leaves `model` as it was
                if os.path.exists(os.path.join(staging, data_name)):  # absent when every tensor is small
                    os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
            else:
                onnx.save(model, staged)
            os.replace(staged, path)
    except OSError as err:
        raise UserInputError(f"-o {path}: cannot write ({err.strerror or err})") from None


def check_writable(option: str, path: str) -> str:
    """The folder `path` would be written into; fails now, before any work, when it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        state = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UserInputError(f"{option} {path}: {folder} {state}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserInputError(f"{option} {path}: cannot write in {folder} ({err.strerror or err})") from None
    return folder


def copy_unchanged(source: str, path: str) -> None:
    """Copy the input file byte for byte (with its external data files) to `path`, atomically."""
    folder = check_writable("-o", path)
    model = onnx.load(source, load_external_data=False)
    files = []
    source_folder = os.path.dirname(os.path.abspath(source))
    if not os.path.samefile(source_folder, folder):
        files += [(os.path.join(source_folder, name), os.path.join(folder, name))
                  for name in sorted(_external_locations(model))]
    files.append((source, os.path.abspath(path)))  # last: the model never points at missing data
    try:
        with _staging(folder) as staging:
            for i, (src, dst) in enumerate(files):
                staged = os.path.join(staging, str(i))
                shutil.copyfile(src, staged)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(staged, dst)
    except OSError as err:
        raise UserInputError(f"-o {path}: cannot write ({err.strerror or err})") from None


def _has_external(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def external_data_files(path: str) -> list[str]:
    """The files a model file keeps its weights in besides itself (none when it cannot be read)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # unreadable: loading reports it properly
        return []
    folder = os.path.dirname(os.path.abspath(path))
    # A location outside the folder (or no file name at all) is never read: loading refuses the model.
    return [os.path.join(folder, name) for name in sorted(_external_locations(model))
            if name and external_location_problem(folder, name) is None]


def _external_locations(model: onnx.ModelProto) -> set[str]:
    """The file names the model's tensors keep their data in ("" where a tensor names none)."""
    return {dict((e.key, e.value) for e in t.external_data).get("location", "")
            for t in onnx.external_data_helper._get_all_tensors(model)
            if onnx.external_data_helper.uses_external_data(t)}
