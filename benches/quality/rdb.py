"""Objects from an R package's lazy-load data base (data/Rdata.rdx + data/Rdata.rdb), without R.

The .rdx index is an ordinary serialized R list (name -> (offset, length)). Each object in the .rdb
is a 4-byte big-endian uncompressed length, then, for R's compression types 2 and 3, one type byte
('Z' raw LZMA2, '2' bzip2, '0' stored) and the payload; without a type byte the payload is zlib.
"""

import bz2
import lzma
import struct
import warnings
import zlib

import rdata

# R writes xz-compressed objects as a raw LZMA2 stream with preset 9|extreme; decoding needs the
# same dictionary size, which this filter spec reproduces.
_LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _parse(data_or_path, from_file):
    with warnings.catch_warnings():
        # rdata warns that an .rdx is "RDS with the wrong extension"; that is what it is.
        warnings.simplefilter("ignore")
        if from_file:
            parsed = rdata.parser.parse_file(data_or_path)
        else:
            parsed = rdata.parser.parse_data(data_or_path)
        return rdata.conversion.convert(parsed)


def _decompress(blob, where):
    if len(blob) < 5:
        raise ValueError(f"{where}: truncated object ({len(blob)} bytes)")
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    if kind == b"Z":
        raw = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=_LZMA2)
    elif kind == b"2":
        raw = bz2.decompress(blob[5:])
    elif kind == b"0":
        raw = blob[5:]
    else:
        raw = zlib.decompress(blob[4:])
    if len(raw) != n:
        raise ValueError(f"{where}: decompressed {len(raw)} bytes, header says {n}")
    return raw


def load(pkg_dir, name):
    """The R object `name` from `pkg_dir/data/Rdata.rdb`, converted by `rdata` (data frames → pandas)."""
    rdx = f"{pkg_dir}/data/Rdata.rdx"
    index = _parse(rdx, True)["variables"]
    if name not in index:
        raise KeyError(f"{rdx}: no object {name!r} (has {sorted(str(k) for k in index)})")
    off, length = (int(x) for x in index[name])
    rdb = f"{pkg_dir}/data/Rdata.rdb"
    with open(rdb, "rb") as f:
        f.seek(off)
        blob = f.read(length)
    return _parse(_decompress(blob, f"{rdb}:{name}"), False)
