"""MIL blob storage version 2: the weight.bin of an .mlpackage, read through a memory map and written as a stream.

Layout (little-endian): a 64-byte header {u32 count, u32 version = 2, zeros}, then per blob a 64-byte
metadata record {u32 0xDEADBEEF, u32 dtype code, u64 sizeInBytes, u64 data offset, u64 padding bits, zeros}
on a 64-byte boundary, its data right after it, and zero bytes up to the next boundary. A model points at a
blob by the offset of its metadata record. The file ends right after the last blob's data.

Why a memory map and views: weight files reach gigabytes; reading a blob costs nothing until its pages are
touched, and `release` hands them back, so a pass over every blob keeps about one blob resident.

Decisions where Core ML's reader is more lenient than this one (it only checks version, sentinel, dtype,
sub-byte padding and bounds):
- metadata and data offsets must be multiples of 64. Core ML's writer always aligns them (it asserts it for
  data), so a misaligned offset is a corrupt offset, and typed views of the data need the alignment.
- byte-sized data must be a whole number of elements (Core ML silently drops a partial element).
- the padding field is ignored for byte-sized dtypes: before coremltools 8 it was an uninitialised reserved
  field, so old files may hold anything there. Reserved fields are never read; the writer writes zeros.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.packing import (
    codes_to_int4,
    int4_to_codes,
    pack_lsb_first,
    padding_bits as _padding_for,
    unpack_lsb_first,
)

ALIGNMENT = 64
HEADER_SIZE = 64
METADATA_SIZE = 64
VERSION = 2
SENTINEL = 0xDEADBEEF

_HEADER = struct.Struct("<II56x")
_METADATA = struct.Struct("<IIQQQ32x")
_COPY_CHUNK = 16 << 20
_CORRUPT = "the file is corrupt (re-export the model)"
_TRUNCATED = "the file is truncated (re-export the model)"
_DISAGREE = "the model and its weight file disagree (re-export the model)"


@dataclass(frozen=True)
class BlobDType:
    """One blob data type: its blob code, MIL DataType code, bit width, and how numpy holds it (the storage
    type for byte-sized types — bit patterns for bf16 and fp8 — and the decoded type for sub-byte ones)."""

    code: int
    name: str
    mil_code: int
    nbits: int
    numpy: np.dtype

    @property
    def sub_byte(self) -> bool:
        return self.nbits < 8


def _dt(code, name, mil_code, nbits, numpy) -> BlobDType:
    return BlobDType(code, name, mil_code, nbits, np.dtype(numpy))


DTYPES: tuple[BlobDType, ...] = (
    _dt(1, "float16", 10, 16, "<f2"),
    _dt(2, "float32", 11, 32, "<f4"),
    _dt(3, "uint8", 31, 8, "u1"),
    _dt(4, "int8", 21, 8, "i1"),
    _dt(5, "bfloat16", 13, 16, "<u2"),
    _dt(6, "int16", 22, 16, "<i2"),
    _dt(7, "uint16", 32, 16, "<u2"),
    _dt(8, "int4", 25, 4, "i1"),
    _dt(9, "uint1", 37, 1, "u1"),
    _dt(10, "uint2", 36, 2, "u1"),
    _dt(11, "uint4", 35, 4, "u1"),
    _dt(12, "uint3", 39, 3, "u1"),
    _dt(13, "uint6", 38, 6, "u1"),
    _dt(14, "int32", 23, 32, "<i4"),
    _dt(15, "uint32", 33, 32, "<u4"),
    _dt(16, "float8e4m3fn", 40, 8, "u1"),
    _dt(17, "float8e5m2", 41, 8, "u1"),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_NAME = {d.name: d for d in DTYPES}
BLOB_CODE_OF_MIL = {d.mil_code: d.code for d in DTYPES}
MIL_CODE_OF_BLOB = {d.code: d.mil_code for d in DTYPES}


def dtype_name(code: int) -> str:
    return BY_CODE[code].name if code in BY_CODE else f"unknown type {code}"


def align(n: int) -> int:
    """The next multiple of 64 at or after `n`."""
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class BlobInfo:
    """A checked metadata record. `offset` is the record's own offset (what a model refers to)."""

    offset: int
    dtype_code: int
    dtype_name: str
    size_in_bytes: int
    data_offset: int
    padding_bits: int

    @property
    def dtype(self) -> BlobDType:
        return BY_CODE[self.dtype_code]

    @property
    def count(self) -> int:
        """Elements in the blob (for sub-byte types: (bits − padding) / width, as Core ML derives it)."""
        d = self.dtype
        if d.sub_byte:
            return (self.size_in_bytes * 8 - self.padding_bits) // d.nbits
        return self.size_in_bytes // (d.nbits // 8)

    @property
    def end(self) -> int:
        return self.data_offset + self.size_in_bytes


def layout_problem(d: BlobDType, size: int, padding: int) -> str | None:
    """Why `size` bytes with `padding` unused bits cannot hold `d` values (None when they can): the rules of
    Core ML's reader for sub-byte data, and whole elements for byte-sized data."""
    if not d.sub_byte:
        width = d.nbits // 8
        if size % width:
            return f"{size} bytes is not a whole number of {width}-byte {d.name} values"
        return None
    if padding >= 8:
        return f"{padding} padding bits (must be under 8)"
    if 8 % d.nbits == 0 and padding % d.nbits:
        return f"{padding} padding bits is not a multiple of {d.nbits} bits"
    bits = size * 8 - padding
    if bits < 0:
        return f"{padding} padding bits in {size} bytes of data"
    if bits % d.nbits:
        return f"{size} bytes less {padding} padding bits leave {bits} bits, not a whole number of {d.nbits}-bit values"
    return None


# -- reader ---------------------------------------------------------------------------------------------


class BlobFile:
    """A weight file opened read-only through a memory map. `where` names it in messages (e.g.
    "model.mlpackage: weights/weight.bin"). Use as a context manager, or call `close`."""

    def __init__(self, path, where: str | None = None):
        self.path = Path(path)
        self.where = where if where is not None else str(path)
        self._file = None
        self._map = None
        try:
            self._open()
        except ModelError:
            self.close()
            raise

    def _open(self) -> None:
        try:
            self._file = open(self.path, "rb")
            weakref.finalize(self, self._file.close)  # a reader dropped without close() still closes its file
            self.size = os.fstat(self._file.fileno()).st_size
        except FileNotFoundError:
            raise self._refuse("the file does not exist", "the package is incomplete (re-export the model)") from None
        except OSError as e:
            raise self._refuse(f"cannot be read ({e.strerror or e})", "check the path and its permissions") from None
        if self.size == 0:
            raise self._refuse("the file is empty, it has no blob storage header", _TRUNCATED)
        if self.size < HEADER_SIZE:
            raise self._refuse(f"{self.size} bytes is shorter than the 64-byte blob storage header", _TRUNCATED)
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise self._refuse(f"cannot be memory-mapped ({e})", "copy the file to a local disk") from None
        self.count, version = _HEADER.unpack_from(self._map, 0)
        if version != VERSION:
            raise self._refuse(
                f"blob storage version {version}, expected 2", "this is not an ML-program weight file (re-export the model)"
            )

    def _refuse(self, what: str, fix: str, offset: int | None = None) -> ModelError:
        """One message: the file, the blob, what is wrong, what to do."""
        at = "" if offset is None else f" blob at offset {offset}:"
        return ModelError(f"{self.where}:{at} {what}; {fix}")

    # lifetime

    def close(self) -> None:
        """Unmap and close. Views handed out keep the mapping alive until they are gone."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # arrays or memoryviews still export it: they own it now
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "BlobFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self._file.fileno()

    # records

    def blob(self, offset: int) -> BlobInfo:
        """The checked metadata record at `offset`: aligned, inside the file, sentinel, known dtype, data
        inside the file, consistent size and padding."""
        self._check_not_shrunk()
        if offset < HEADER_SIZE or offset + METADATA_SIZE > self.size:
            raise self._refuse(
                f"the offset is outside the blob records of this {self.size}-byte file",
                "the model refers to another weight file or this one is truncated (re-export the model)",
                offset,
            )
        if offset % ALIGNMENT:
            raise self._refuse(
                "the offset is not a multiple of 64 (blob records are 64-byte aligned)",
                "the offset or the file is corrupt (re-export the model)",
                offset,
            )
        sentinel, code, size, data_offset, padding = _METADATA.unpack_from(self._map, offset)
        if sentinel != SENTINEL:
            raise self._refuse(f"sentinel 0x{sentinel:08x} is not 0xDEADBEEF", _CORRUPT, offset)
        if code not in BY_CODE:
            raise self._refuse(
                f"unknown data type code {code} (known: 1..17)",
                "the file is corrupt or from a newer Core ML (re-export the model)",
                offset,
            )
        d = BY_CODE[code]
        if data_offset % ALIGNMENT:
            raise self._refuse(f"data offset {data_offset} is not a multiple of 64", _CORRUPT, offset)
        if data_offset + size > self.size:
            raise self._refuse(
                f"its {size} bytes of data at offset {data_offset} end beyond the end of the file ({self.size} bytes)",
                _TRUNCATED,
                offset,
            )
        padding = padding if d.sub_byte else 0  # an uninitialised field before coremltools 8
        problem = layout_problem(d, size, padding)
        if problem:
            raise self._refuse(f"{d.name} data: {problem}", _CORRUPT, offset)
        return BlobInfo(offset, code, d.name, size, data_offset, padding)

    def _check_not_shrunk(self) -> None:
        """Reading a mapped page past the end of a file that shrank kills the process (SIGBUS): refuse first
        (a file truncated by another program while this one reads it)."""
        try:
            now = os.fstat(self._file.fileno()).st_size
        except (AttributeError, OSError, ValueError):  # closed
            raise self._refuse("the file was closed", "reload the model") from None
        if now < self.size:
            raise self._refuse(f"the file shrank from {self.size} to {now} bytes while it was open (another program "
                               "changed it)", "restore the file and load the model again")

    def offsets(self) -> list[int]:
        """Every record's offset, walking the file as Core ML does: the first right after the header, each
        next one at the 64-byte boundary after the previous data. Checks each record."""
        if HEADER_SIZE + self.count * METADATA_SIZE > self.size:
            raise self._refuse(
                f"the header counts {self.count} blobs, more than a {self.size}-byte file can hold",
                "the file is corrupt or truncated (re-export the model)",
            )
        found = []
        at = HEADER_SIZE
        for _ in range(self.count):  # bounded: each step moves forward by at least 64 bytes
            info = self.blob(at)
            found.append(at)
            following = align(info.end)
            if following <= at:
                raise self._refuse(
                    f"its data at offset {info.data_offset} lie before its record, so the records cannot be walked",
                    _CORRUPT,
                    at,
                )
            at = following
        return found

    def blobs(self) -> list[BlobInfo]:
        return [self.blob(o) for o in self.offsets()]

    # data

    def raw(self, offset: int) -> memoryview:
        """The data bytes of a blob, without copying."""
        info = self.blob(offset)
        return self.span(info.data_offset, info.size_in_bytes)

    def span(self, start: int, size: int) -> memoryview:
        """Bytes `start` .. `start + size` of the file, without copying (bounds are the caller's: `blob`)."""
        return memoryview(self._map)[start : start + size]

    def array(self, offset: int, dtype_code: int, count: int | None) -> np.ndarray:
        """The blob's values, checked against what the model declares (`dtype_code`; `count` elements, or
        None to skip that check): a read-only view into the mapping for byte-sized types, decoded codes
        (uint8; int8 for int4) for sub-byte ones."""
        info = self.checked(offset, dtype_code, count)
        d = info.dtype
        if not d.sub_byte:
            return np.frombuffer(self._map, dtype=d.numpy, count=info.count, offset=info.data_offset)
        codes = unpack_lsb_first(self.span(info.data_offset, info.size_in_bytes), d.nbits, info.count)
        return codes_to_int4(codes) if d.name == "int4" else codes

    def checked(self, offset: int, dtype_code: int, count: int | None) -> BlobInfo:
        """The blob's record, checked against what the model declares (`dtype_code`; `count` elements, or
        None to skip that check), without touching its data: what a load-time pass over every value reads."""
        info = self.blob(offset)
        if info.dtype_code != dtype_code:
            raise self._refuse(
                f"the blob holds {info.dtype_name} (code {info.dtype_code}), the model declares "
                f"{dtype_name(dtype_code)} (code {dtype_code})",
                _DISAGREE,
                offset,
            )
        if count is not None and info.count != count:
            raise self._refuse(
                f"the blob holds {info.count} {info.dtype_name} values, the model declares {count}", _DISAGREE, offset
            )
        return info

    @contextmanager
    def loaded(self, offset: int, dtype_code: int, count: int | None) -> Iterator[np.ndarray]:
        """`array`, then `release` when the block ends (the view stays valid; it pages in again if used)."""
        try:
            yield self.array(offset, dtype_code, count)
        finally:
            self.release(offset)

    def release(self, offset: int) -> None:
        """Drop the resident pages of a blob's record and data (advice only: a no-op where madvise or
        MADV_DONTNEED is missing). Pages come back from the file on the next access."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or not hasattr(self._map, "madvise"):
            return
        info = self.blob(offset)
        page = mmap.PAGESIZE
        start = min(offset, info.data_offset) // page * page
        stop = min(-(-info.end // page) * page, self.size)
        if stop > start:
            try:
                self._map.madvise(advice, start, stop - start)
            except OSError:
                pass


# -- writer ---------------------------------------------------------------------------------------------


class BlobWriter:
    """Writes a weight file as a stream: header now, each blob as it is added, the count on `close`.

    `file` is a path (created or truncated, closed by `close`) or a binary file object open for writing at
    position 0 (left open). Output bytes depend only on the sequence of blobs. Use as a context manager."""

    def __init__(self, file):
        if hasattr(file, "write"):
            self._out: BinaryIO = file
            self._owned = False
        else:
            self._out = open(file, "wb")
            self._owned = True
        self._out.write(_HEADER.pack(0, VERSION))
        self._pos = HEADER_SIZE
        self.count = 0
        self._closed = False

    def add(self, data, dtype_code: int, padding_bits: int = 0) -> int:
        """Append a blob; returns the offset of its metadata record (what the model stores).

        `data` is either a numpy array of values — the dtype's own numpy type for byte-sized types (uint16 /
        uint8 bit patterns for bf16 / fp8), integer codes for sub-byte types (int8 -8..7 or uint8 codes for
        int4), packed here — or already encoded bytes, with `padding_bits` for sub-byte types."""
        d = _known(dtype_code)
        payload, padding = _encode(data, d, padding_bits)
        return self._append(d.code, payload, padding)

    def copy_from(self, reader: BlobFile, offset: int) -> int:
        """Append a blob of another weight file unchanged (no decoding); returns its new offset."""
        info = reader.blob(offset)
        meta = self._start(info.dtype_code, info.size_in_bytes, info.padding_bits)
        if not self._copy_range(reader, info.data_offset, info.size_in_bytes):
            with reader.raw(offset) as data:
                for start in range(0, info.size_in_bytes, _COPY_CHUNK):
                    self._out.write(data[start : start + _COPY_CHUNK])
            reader.release(offset)
        self._pos += info.size_in_bytes
        return meta

    def flush_header(self) -> None:
        """Write the count so far into the header and flush: the file is a valid weight file now (for a
        reader mapping it while this writer goes on appending)."""
        self._out.seek(0)
        self._out.write(struct.pack("<I", self.count))
        self._out.seek(self._pos)
        self._out.flush()

    def close(self) -> None:
        """Write the blob count into the header; close the file if this writer opened it."""
        if self._closed:
            return
        self._closed = True
        self._out.seek(0)
        self._out.write(struct.pack("<I", self.count))
        self._out.seek(self._pos)
        self._out.flush()
        if self._owned:
            self._out.close()

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # internals

    def _start(self, code: int, size: int, padding: int) -> int:
        """Zero padding to the boundary, then the metadata record; returns the record's offset."""
        if self._closed:
            raise ValueError("the blob writer is closed")
        if self.count == 0xFFFFFFFF:
            raise ValueError("a weight file holds at most 2**32 - 1 blobs")
        meta = align(self._pos)
        self._out.write(bytes(meta - self._pos))
        self._out.write(_METADATA.pack(SENTINEL, code, size, meta + METADATA_SIZE, padding))
        self._pos = meta + METADATA_SIZE
        self.count += 1
        return meta

    def _append(self, code: int, payload, padding: int) -> int:
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        meta = self._start(code, size, padding)
        self._out.write(payload)
        self._pos += size
        return meta

    def _copy_range(self, reader: BlobFile, start: int, size: int) -> bool:
        """Copy file to file in the kernel when both ends are files; False when that is not possible (then
        nothing was written)."""
        copy = getattr(os, "copy_file_range", None)
        if copy is None or size == 0:
            return size == 0
        try:
            out_fd = self._out.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        self._out.flush()
        done = 0
        try:
            while done < size:
                n = copy(reader.fileno(), out_fd, size - done, start + done, self._pos + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass
        if done < size:  # unsupported here, or a short copy: write the rest from the mapping
            with reader.span(start + done, size - done) as rest:
                self._out.seek(self._pos + done)
                self._out.write(rest)
        self._out.seek(self._pos + size)
        return True


def _known(code: int) -> BlobDType:
    if code not in BY_CODE:
        raise ValueError(f"unknown blob data type code {code} (known: 1..17)")
    return BY_CODE[code]


def _encode(data, d: BlobDType, padding_bits: int):
    """(bytes-like payload, padding bits) for `data` of type `d`; ValueError for a caller's mistake."""
    if isinstance(data, np.ndarray):
        if d.sub_byte and data.dtype == np.bool_ and d.nbits == 1:  # a mask: numpy packs it LSB first as it is
            return memoryview(np.packbits(data.reshape(-1), bitorder="little")), _padding_for(data.size, 1)
        if d.sub_byte:
            if not np.issubdtype(data.dtype, np.integer):
                raise ValueError(f"{d.name} values must be an integer array, got {data.dtype}")
            codes = int4_to_codes(data) if d.name == "int4" and np.issubdtype(data.dtype, np.signedinteger) else data
            padding = _padding_for(data.size, d.nbits)
            if padding_bits not in (0, padding):
                raise ValueError(f"{data.size} {d.name} values need {padding} padding bits, not {padding_bits}")
            return pack_lsb_first(codes, d.nbits), padding
        if data.dtype != d.numpy:
            raise ValueError(f"{d.name} blob data must be a {d.numpy} array, got {data.dtype}")
        if padding_bits:
            raise ValueError(f"{d.name} data have no padding bits, got {padding_bits}")
        return memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B"), 0
    payload = memoryview(data).cast("B")
    if padding_bits and not d.sub_byte:
        problem = f"{d.name} data have no padding bits, got {padding_bits}"
    else:
        problem = layout_problem(d, payload.nbytes, padding_bits)
    if problem:
        raise ValueError(f"{d.name} blob data: {problem}")
    return payload, padding_bits
