import io
import mmap
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mlqpipe.errors import ModelError
from mlqpipe.formats.mlprogram.blob import (
    BLOB_CODE_OF_MIL,
    BY_NAME,
    DTYPES,
    MIL_CODE_OF_BLOB,
    BlobFile,
    BlobInfo,
    BlobWriter,
)
from mlqpipe.formats.mlprogram.packing import int4_to_codes, pack_lsb_first

# -- helpers ------------------------------------------------------------------------------------------------


def _values(d, n: int, seed: int) -> np.ndarray:
    """n values of blob type d: random bit patterns for byte-sized types, random codes for sub-byte ones."""
    rng = np.random.default_rng(seed)
    if d.name == "int4":
        return rng.integers(-8, 8, n).astype(np.int8)
    if d.sub_byte:
        return rng.integers(0, 2**d.nbits, n).astype(np.uint8)
    return rng.integers(0, 256, n * d.numpy.itemsize).astype(np.uint8).view(d.numpy)


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def _write(path, blobs) -> list[int]:
    with BlobWriter(path) as w:
        return [w.add(a, d.code) for d, a in blobs]


_sequences = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.integers(0, 300), st.integers(0, 2**32 - 1)), max_size=8
)


def _blobs(spec):
    return [(d, _values(d, n, seed)) for d, n, seed in spec]


# coremltools' Python binding of Core ML's blob storage (MILBlob), a test-only oracle: method suffix per type
_CT_METHOD = {
    "float16": "fp16", "float32": "float", "uint8": "uint8", "int8": "int8", "int16": "int16", "uint16": "uint16",
    "int32": "int32", "uint32": "uint32", "int4": "int4", "uint1": "uint1", "uint2": "uint2", "uint3": "uint3",
    "uint4": "uint4", "uint6": "uint6",
}  # no bfloat16 / float8 in 9.0's binding
_CT_DTYPES = [d for d in DTYPES if d.name in _CT_METHOD]


@pytest.fixture(scope="module")
def milstorage():
    return pytest.importorskip("coremltools.libmilstoragepython")


def _ct_form(d, a):
    return a.view(np.uint16) if d.name == "float16" else a


# -- the table ------------------------------------------------------------------------------------------------


def test_dtype_table():
    assert [d.code for d in DTYPES] == list(range(1, 18))
    assert BLOB_CODE_OF_MIL == {10: 1, 11: 2, 31: 3, 21: 4, 13: 5, 22: 6, 32: 7, 25: 8, 37: 9, 36: 10, 35: 11,
                                39: 12, 38: 13, 23: 14, 33: 15, 40: 16, 41: 17}
    assert MIL_CODE_OF_BLOB == {b: m for m, b in BLOB_CODE_OF_MIL.items()}
    assert {d.name: d.nbits for d in DTYPES if d.sub_byte} == {"int4": 4, "uint1": 1, "uint2": 2, "uint4": 4,
                                                               "uint3": 3, "uint6": 6}


# -- layout and round trips -------------------------------------------------------------------------------------


def test_known_bytes(tmp_path):
    """One fp32 blob and one uint3 blob, byte by byte."""
    path = tmp_path / "w.bin"
    offsets = _write(path, [(BY_NAME["float32"], np.array([1.0, -2.0], np.float32)),
                            (BY_NAME["uint3"], np.array([5, 3, 7], np.uint8))])
    assert offsets == [64, 192]
    data = path.read_bytes()
    assert data[:64] == struct.pack("<II", 2, 2) + bytes(56)
    assert data[64:128] == struct.pack("<IIQQQ", 0xDEADBEEF, 2, 8, 128, 0) + bytes(32)
    assert data[128:136] == struct.pack("<2f", 1.0, -2.0)
    assert data[136:192] == bytes(56)
    assert data[192:256] == struct.pack("<IIQQQ", 0xDEADBEEF, 12, 2, 256, 7) + bytes(32)
    assert data[256:] == bytes([0b11011101, 0b00000001])  # the file ends right after the last data
    with BlobFile(path) as f:
        assert f.blob(192) == BlobInfo(192, 12, "uint3", 2, 256, 7)
        assert f.blob(192).count == 3


@settings(max_examples=60, deadline=None)
@given(_sequences)
def test_write_read_copy_round_trip(spec):
    blobs = _blobs(spec)
    with tempfile.TemporaryDirectory() as tmp:
        first, second, third = Path(tmp, "a.bin"), Path(tmp, "b.bin"), Path(tmp, "c.bin")
        offsets = _write(first, blobs)
        assert all(o % 64 == 0 for o in offsets)
        with BlobFile(first, "a.bin") as f:
            assert f.count == len(blobs) and f.offsets() == offsets
            for (d, a), o in zip(blobs, offsets):
                assert _same(f.array(o, d.code, a.size), a)
                assert f.blob(o).data_offset == o + 64
            with BlobWriter(second) as w:  # through the kernel copy
                assert [w.copy_from(f, o) for o in offsets] == offsets
            sink = io.BytesIO()  # through the mapping
            with BlobWriter(sink) as w:
                assert [w.copy_from(f, o) for o in offsets] == offsets
        assert second.read_bytes() == first.read_bytes() == sink.getvalue()
        with BlobWriter(third) as w:  # bytes in, the same file out
            for d, a in blobs:
                if d.sub_byte:
                    codes = int4_to_codes(a) if d.name == "int4" else a
                    w.add(pack_lsb_first(codes, d.nbits), d.code, -(a.size * d.nbits) % 8)
                else:
                    w.add(a.tobytes(), d.code)
        assert third.read_bytes() == first.read_bytes()


def test_copy_falls_back_when_the_kernel_cannot_copy(tmp_path, monkeypatch):
    blobs = [(BY_NAME[n], _values(BY_NAME[n], k, 1)) for n, k in [("float16", 100), ("uint6", 33)]]
    offsets = _write(tmp_path / "a.bin", blobs)

    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    with BlobFile(tmp_path / "a.bin") as f, BlobWriter(tmp_path / "b.bin") as w:
        assert [w.copy_from(f, o) for o in offsets] == offsets
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


def test_writer_refuses_wrong_input(tmp_path):
    with BlobWriter(tmp_path / "w.bin") as w:
        with pytest.raises(ValueError, match=r"^float16 blob data must be a float16 array, got float32$"):
            w.add(np.zeros(3, np.float32), 1)
        with pytest.raises(ValueError, match=r"^uint4 blob data: 3 padding bits is not a multiple of 4 bits$"):
            w.add(b"\x01", 11, 3)
        with pytest.raises(ValueError, match=r"^int32 blob data: 6 bytes is not a whole number of 4-byte int32"):
            w.add(bytes(6), 14)
        with pytest.raises(ValueError, match=r"^values must be in 0..3 to pack them in 2 bits, got 0..4$"):
            w.add(np.array([0, 4], np.uint8), 10)
        with pytest.raises(ValueError, match=r"^unknown blob data type code 18 \(known: 1..17\)$"):
            w.add(b"", 18)
        assert w.count == 0
    assert (tmp_path / "w.bin").read_bytes() == struct.pack("<II", 0, 2) + bytes(56)


# -- coremltools as the oracle ------------------------------------------------------------------------------------


_ct_sequences = st.lists(
    st.tuples(st.sampled_from(_CT_DTYPES), st.integers(0, 300), st.integers(0, 2**32 - 1)), max_size=8
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_ct_sequences)
def test_same_bytes_as_coremltools_and_read_back_by_it(milstorage, spec):
    blobs = _blobs(spec)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp, "ours.bin"), Path(tmp, "theirs.bin")
        offsets = _write(ours, blobs)
        writer = milstorage._BlobStorageWriter(str(theirs))
        their_offsets = [getattr(writer, f"write_{_CT_METHOD[d.name]}_data")(_ct_form(d, a)) for d, a in blobs]
        del writer  # closes its file
        assert their_offsets == offsets
        assert ours.read_bytes() == theirs.read_bytes()
        reader = milstorage._BlobStorageReader(str(ours))
        for (d, a), o in zip(blobs, offsets):
            if a.size:  # its binding fails ("index out of bounds") on empty blobs, which it never writes
                assert _same(getattr(reader, f"read_{_CT_METHOD[d.name]}_data")(o), _ct_form(d, a))


# -- bad input: one message each ----------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    """A valid file: fp32[16] at 64, uint4[5] at 192 (4 padding bits); returns (path, bytes)."""
    path = tmp_path / "weight.bin"
    _write(path, [(BY_NAME["float32"], np.arange(16, dtype=np.float32)), (BY_NAME["uint4"], np.arange(5, dtype=np.uint8))])
    return path, bytearray(path.read_bytes())


def _corrupt(path: Path, data: bytearray, at: int, fmt: str, value) -> None:
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


W = "m.mlpackage: weights/weight.bin"


def test_wrong_version(small):
    path, data = small
    _corrupt(path, data, 4, "<I", 1)
    with pytest.raises(ModelError) as e:
        BlobFile(path, W)
    assert str(e.value) == (f"{W}: blob storage version 1, expected 2; this is not an ML-program weight file "
                            "(re-export the model)")


CORRUPT = "; the file is corrupt (re-export the model)"
TRUNCATED = "; the file is truncated (re-export the model)"


@pytest.mark.parametrize(
    "at, fmt, value, blob, message",
    [
        (64, "<I", 0xDEADBEEE, 64, "sentinel 0xdeadbeee is not 0xDEADBEEF" + CORRUPT),
        (68, "<I", 99, 64, "unknown data type code 99 (known: 1..17); the file is corrupt or from a newer Core ML "
                           "(re-export the model)"),
        (72, "<Q", 10, 64, "float32 data: 10 bytes is not a whole number of 4-byte float32 values" + CORRUPT),
        (80, "<Q", 100, 64, "data offset 100 is not a multiple of 64" + CORRUPT),
        (80, "<Q", 256, 64, "its 64 bytes of data at offset 256 end beyond the end of the file (259 bytes)" + TRUNCATED),
        (216, "<Q", 2, 192, "uint4 data: 2 padding bits is not a multiple of 4 bits" + CORRUPT),
        (216, "<Q", 8, 192, "uint4 data: 8 padding bits (must be under 8)" + CORRUPT),
        (200, "<Q", 0, 192, "uint4 data: 4 padding bits in 0 bytes of data" + CORRUPT),
    ],
)
def test_bad_metadata(small, at, fmt, value, blob, message):
    path, data = small
    _corrupt(path, data, at, fmt, value)
    with BlobFile(path, W) as f:
        with pytest.raises(ModelError) as e:
            f.blob(blob)
        assert str(e.value) == f"{W}: blob at offset {blob}: {message}"
        with pytest.raises(ModelError):
            f.offsets()


def test_sub_byte_padding_that_leaves_partial_values(tmp_path):
    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        w.add(bytes(3), 12, 0)  # 8 uint3 values
    data = bytearray(path.read_bytes())
    _corrupt(path, data, 64 + 24, "<Q", 1)
    with BlobFile(path, W) as f, pytest.raises(ModelError) as e:
        f.blob(64)
    assert str(e.value) == (f"{W}: blob at offset 64: uint3 data: 3 bytes less 1 padding bits leave 23 bits, not a "
                            "whole number of 3-bit values; the file is corrupt (re-export the model)")


def test_byte_sized_padding_field_is_ignored(small):
    """Before coremltools 8 the field was uninitialised: Core ML ignores it for byte-sized types, so do we."""
    path, data = small
    _corrupt(path, data, 88, "<Q", 0x1234)
    with BlobFile(path, W) as f:
        assert f.blob(64).padding_bits == 0
        assert f.array(64, 2, 16).tolist() == list(range(16))


_OUTSIDE = ("the offset is outside the blob records of this 259-byte file; the model refers to another weight "
            "file or this one is truncated (re-export the model)")


@pytest.mark.parametrize(
    "offset, message",
    [
        (10**6, _OUTSIDE),
        (0, _OUTSIDE),
        (96, "the offset is not a multiple of 64 (blob records are 64-byte aligned); the offset or the file is "
             "corrupt (re-export the model)"),
    ],
)
def test_bad_offset(small, offset, message):
    path, _ = small
    with BlobFile(path, W) as f, pytest.raises(ModelError) as e:
        f.array(offset, 2, 16)
    assert str(e.value) == f"{W}: blob at offset {offset}: {message}"


def test_truncated_data(small):
    path, data = small
    path.write_bytes(bytes(data[:150]))
    with BlobFile(path, W) as f, pytest.raises(ModelError) as e:
        f.array(64, 2, 16)
    assert str(e.value) == (f"{W}: blob at offset 64: its 64 bytes of data at offset 128 end beyond the end of the "
                            "file (150 bytes); the file is truncated (re-export the model)")


def test_dtype_and_count_mismatch(small):
    path, _ = small
    with BlobFile(path, W) as f:
        with pytest.raises(ModelError) as e:
            f.array(64, 1, 16)
        assert str(e.value) == (f"{W}: blob at offset 64: the blob holds float32 (code 2), the model declares "
                                "float16 (code 1); the model and its weight file disagree (re-export the model)")
        with pytest.raises(ModelError) as e:
            f.array(192, 11, 6)
        assert str(e.value) == (f"{W}: blob at offset 192: the blob holds 5 uint4 values, the model declares 6; "
                                "the model and its weight file disagree (re-export the model)")
        with pytest.raises(ModelError, match=r"declares unknown type 77 \(code 77\)"):
            f.array(64, 77, 16)


def test_count_larger_than_the_file(small):
    path, data = small
    _corrupt(path, data, 0, "<I", 5)
    with BlobFile(path, W) as f, pytest.raises(ModelError) as e:
        f.offsets()
    assert str(e.value) == (f"{W}: the header counts 5 blobs, more than a 259-byte file can hold; the file is "
                            "corrupt or truncated (re-export the model)")


def test_records_that_do_not_move_forward(small):
    path, data = small
    _corrupt(path, data, 0, "<I", 3)
    _corrupt(path, data, 80, "<Q", 0)  # data "at" the header, 64 bytes long: the next record would be at 64
    with BlobFile(path, W) as f, pytest.raises(ModelError) as e:
        f.offsets()
    assert str(e.value) == (f"{W}: blob at offset 64: its data at offset 0 lie before its record, so the records "
                            "cannot be walked; the file is corrupt (re-export the model)")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "the file does not exist; the package is incomplete (re-export the model)"),
        (b"", "the file is empty, it has no blob storage header; the file is truncated (re-export the model)"),
        (bytes(63), "63 bytes is shorter than the 64-byte blob storage header; the file is truncated (re-export the model)"),
    ],
)
def test_missing_empty_short(tmp_path, content, message):
    path = tmp_path / "weight.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError) as e:
        BlobFile(path, W)
    assert str(e.value) == f"{W}: {message}"


def test_directory_is_refused(tmp_path):
    with pytest.raises(ModelError, match=rf"^{W}: cannot be read \(Is a directory\)"):
        BlobFile(tmp_path, W)


# -- fuzz: ModelError or success, nothing else ----------------------------------------------------------------------


def _fuzz_file() -> tuple[bytes, list[tuple[int, int, int]]]:
    blobs = [(BY_NAME[n], _values(BY_NAME[n], k, 7)) for n, k in
             [("float16", 11), ("int4", 9), ("uint3", 13), ("uint8", 0), ("uint1", 10), ("int32", 3)]]
    with tempfile.TemporaryDirectory() as tmp:
        offsets = _write(Path(tmp, "w.bin"), blobs)
        data = Path(tmp, "w.bin").read_bytes()
    return data, [(o, d.code, a.size) for (d, a), o in zip(blobs, offsets)]


_FUZZ, _FUZZ_REFS = _fuzz_file()


def _read_everything(path: Path) -> None:
    """What check / inspect and the loader do with a weight file; only ModelError may come out."""
    try:
        with BlobFile(path, W) as f:
            for offset, code, count in _FUZZ_REFS:  # as the model refers to them
                try:
                    f.array(offset, code, count)
                except ModelError:
                    pass
            try:
                found = f.offsets()
            except ModelError:
                return
            for offset in found:
                info = f.blob(offset)
                f.array(offset, info.dtype_code, info.count)
                bytes(f.raw(offset))
                f.release(offset)
    except ModelError:
        pass


def test_fuzz_every_truncation(tmp_path):
    path = tmp_path / "w.bin"
    for n in range(len(_FUZZ) + 1):
        path.write_bytes(_FUZZ[:n])
        _read_everything(path)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(_FUZZ) * 8 - 1), min_size=1, max_size=6))
def test_fuzz_bit_flips(bits):
    data = bytearray(_FUZZ)
    for b in bits:
        data[b // 8] ^= 1 << (b % 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "w.bin")
        path.write_bytes(bytes(data))
        _read_everything(path)


# -- memory ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [d.name for d in DTYPES if not d.sub_byte])
def test_byte_sized_arrays_are_views_of_the_mapping(tmp_path, name):
    d = BY_NAME[name]
    a = _values(d, 40, 3)
    (offset,) = _write(tmp_path / "w.bin", [(d, a)])
    with BlobFile(tmp_path / "w.bin") as f:
        view = f.array(offset, d.code, 40)
        assert _same(view, a)
        assert not view.flags.writeable
        assert np.shares_memory(view, np.frombuffer(f.raw(offset), np.uint8))
        assert isinstance(view.base.obj, mmap.mmap)
    assert _same(view, a)  # still readable after close: the view keeps the mapping alive


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"), reason="needs Linux smaps and madvise")
def test_release_drops_the_pages_of_a_blob(tmp_path):
    path = (tmp_path / "w.bin").resolve()
    big = np.arange(2 << 20, dtype=np.float32)  # 8 MiB
    offsets = _write(path, [(BY_NAME["float32"], big), (BY_NAME["int8"], np.ones(100, np.int8))])
    with BlobFile(path) as f:
        with f.loaded(offsets[0], 2, big.size) as view:
            assert float(view[::1024].sum()) == float(big[::1024].sum())  # touches every page
            assert _resident_kib(path) >= 7 * 1024
        assert _resident_kib(path) <= 64
        assert float(view[-1]) == float(big[-1])  # pages come back from the file


# -- weight files coremltools wrote (the catalog) ------------------------------------------------------------------

# package -> blob types its weight.bin must hold (so the comparison below cannot pass vacuously)
_CATALOG_TYPES = {
    "mlp_ios18_fp32": {"float32"},
    "mlp_ios17_fp16": {"float16"},
    "ios16_lut": {"float32", "uint8"},  # iOS16 constexprs take packed indices and masks as uint8
    "ios16_sparse": {"float32", "uint8"},
    "ios18_int4_block": {"float32", "int4"},
    "ios18_lut_3bit": {"float32", "uint3"},
    "ios18_joint_sparse_lut": {"float32", "uint1", "uint4"},
}


@pytest.mark.parametrize("name", sorted(_CATALOG_TYPES))
def test_catalog_weight_files(mlpackage, milstorage, tmp_path, name):
    """Every blob of a coremltools-written weight.bin decodes as coremltools decodes it, and copying every
    blob, or writing its decoded values afresh, gives the original file byte for byte."""
    (original,) = (mlpackage(name) / "Data").rglob("weight.bin")
    reader = milstorage._BlobStorageReader(str(original))
    copied, rewritten = tmp_path / "copied.bin", tmp_path / "rewritten.bin"
    with BlobFile(original, f"{name}: weight.bin") as f:
        infos = f.blobs()
        assert {i.dtype_name for i in infos} == _CATALOG_TYPES[name]
        with BlobWriter(copied) as w:
            assert [w.copy_from(f, i.offset) for i in infos] == [i.offset for i in infos]
        with BlobWriter(rewritten) as w:
            for i in infos:
                with f.loaded(i.offset, i.dtype_code, i.count) as values:
                    theirs = getattr(reader, f"read_{_CT_METHOD[i.dtype_name]}_data")(i.offset)
                    assert _same(_ct_form(i.dtype, values), theirs)
                    assert w.add(values, i.dtype_code) == i.offset
    assert copied.read_bytes() == original.read_bytes()
    assert rewritten.read_bytes() == original.read_bytes()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_a_bool_mask_is_written_as_its_uint1_codes(tmp_path, n):
    """Masks go in as bool arrays (no byte-per-element copy first): the same blob as their 0/1 codes."""
    mask = np.random.default_rng(n).random(n) < 0.4
    uint1 = BY_NAME["uint1"].code
    with BlobWriter(tmp_path / "bool.bin") as w:
        at = w.add(mask, uint1)
    with BlobWriter(tmp_path / "codes.bin") as w:
        assert w.add(mask.astype(np.uint8), uint1) == at
    assert (tmp_path / "bool.bin").read_bytes() == (tmp_path / "codes.bin").read_bytes()
    with BlobFile(tmp_path / "bool.bin") as f:
        assert np.array_equal(f.array(at, uint1, n), mask.astype(np.uint8))
    with pytest.raises(ValueError, match="uint2 values must be an integer array, got bool"):
        BlobWriter(tmp_path / "other.bin").add(mask, BY_NAME["uint2"].code)


def test_a_reader_dropped_without_close_still_closes_its_file(tmp_path):
    """A model nobody closes (its readers go with it) must not leak an open file (a ResourceWarning under -X dev)."""
    import gc
    import warnings

    path = tmp_path / "w.bin"
    with BlobWriter(path) as w:
        at = w.add(np.arange(16, dtype=np.float32), BY_NAME["float32"].code)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = BlobFile(path)
        assert reader.array(at, BY_NAME["float32"].code, 16)[3] == 3
        del reader
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
