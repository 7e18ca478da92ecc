"""A reader for CTranslate2's ``model.bin`` (binary versions 4 to 6), so that converting a
CTranslate2 model needs neither the ``ctranslate2`` package nor its native library.

Layout (little-endian; a *string* is a ``uint16`` byte count followed by that many bytes,
the last one a NUL)::

    uint32 binary_version
    string spec_name; uint32 spec_revision             (version >= 2)
    uint32 n_variables
    n_variables x { string name; uint8 rank; uint32 dims[rank];
                    uint8 dtype; uint32 n_bytes; bytes data[n_bytes] }
    uint32 n_aliases                                   (version >= 3)
    n_aliases x { string alias; string variable_name }
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: CTranslate2's ``DataType`` enum -> numpy dtype (bfloat16 and float8 have no numpy type).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
SUPPORTED_VERSIONS = range(4, 7)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands."""


@dataclass
class CT2Model:
    """The contents of one ``model.bin``: the spec name (e.g. ``"WhisperSpec"``) and every
    variable by name (aliases resolved to the same array)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.take("H")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def array(self, dtype: np.dtype, shape: tuple[int, ...], n_bytes: int) -> np.ndarray:
        if self.pos + n_bytes > len(self.data):
            raise CT2FormatError("truncated file")
        # A copy: the arrays outlive the file buffer and torch wants writable memory.
        out = np.frombuffer(self.data, dtype, n_bytes // dtype.itemsize, self.pos).copy()
        self.pos += n_bytes
        return out.reshape(shape)


def read_ct2(path: str | Path) -> CT2Model:
    """Parse ``path``; raise :class:`CT2FormatError` on anything unexpected."""
    cur = _Cursor(Path(path).read_bytes())
    try:
        (version,) = cur.take("I")
        if version not in SUPPORTED_VERSIONS:
            raise CT2FormatError(
                f"binary version {version} (this reader knows "
                f"{SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1})"
            )
        spec = cur.string()
        (revision,) = cur.take("I")
        (n_vars,) = cur.take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(n_vars):
            name = cur.string()
            (rank,) = cur.take("B")
            shape = cur.take(f"{rank}I") if rank else ()
            dtype_id, n_bytes = cur.take("BI")
            if dtype_id not in _DTYPES:
                raise CT2FormatError(f"variable {name}: unsupported dtype id {dtype_id}")
            dtype = _DTYPES[dtype_id]
            if n_bytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CT2FormatError(f"variable {name}: {n_bytes} bytes for shape {shape}")
            variables[name] = cur.array(dtype, tuple(shape), n_bytes)
        (n_aliases,) = cur.take("I")
        for _ in range(n_aliases):
            alias, target = cur.string(), cur.string()
            variables[alias] = variables[target]
    except struct.error as exc:
        raise CT2FormatError(f"truncated file: {exc}") from exc
    if cur.pos != len(cur.data):
        raise CT2FormatError(f"{len(cur.data) - cur.pos} trailing bytes")
    return CT2Model(spec, revision, variables)
