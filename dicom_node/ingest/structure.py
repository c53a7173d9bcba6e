"""Whether a received data set is well formed, checked before it is answered Success.

pydicom reads leniently: it stops quietly at a value cut short, skips what follows the last
element it understands, and switches to implicit VR when explicit VR bytes do not look right.
An instance acknowledged on such a read is a promise the node cannot keep: the stored file is
corrupt, and the PACS, told Success, never sends it again. So every data set is walked here
element header by element header to its last byte, sequences and encapsulated pixel data
included, without decoding a value: each length must fit where it stands, each explicit VR
must be one the standard defines, top-level tags must ascend, and the walk must end exactly at
the end of the data.

Deflated data sets are inflated first, within a bound (`inflate`), so that a small compressed
data set cannot make the receiver allocate gigabytes.
"""

from __future__ import annotations

import functools
import struct
import zlib

from pydicom.datadict import dictionary_VR

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# VRs with a 4-byte length in explicit VR (PS3.5 7.1.2); every other known VR has 2 bytes.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
    b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
})
# Nesting deeper than this is no real object's: a bound on the walk's recursion.
MAX_DEPTH = 32
INFLATE_CHUNK = 1024 * 1024


class MalformedDataSet(ValueError):
    """The data set is not well formed; the message says where and why."""


class TooLarge(ValueError):
    """The data set inflates to more than the node takes."""


def inflate(deflated, limit: int) -> bytearray:
    """The data set of a Deflated transfer syntax (raw deflate, PS3.5 A.5), at most ``limit``
    bytes of it: more is `TooLarge`, found with at most ``limit`` bytes allocated."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()  # grown in place: never a second copy of what was inflated
    view = memoryview(deflated)
    try:
        for start in range(0, len(view), INFLATE_CHUNK):
            pending = view[start:start + INFLATE_CHUNK]
            while pending:
                inflated += inflater.decompress(pending, min(limit - len(inflated) + 1, INFLATE_CHUNK))
                if len(inflated) > limit:
                    raise TooLarge(f"the deflated data set inflates to more than {limit} bytes")
                pending = inflater.unconsumed_tail
        inflated += inflater.flush()
    except zlib.error as error:
        raise MalformedDataSet(f"the deflated data set cannot be inflated ({error})") from error
    if len(inflated) > limit:
        raise TooLarge(f"the deflated data set inflates to more than {limit} bytes")
    if not inflater.eof:
        raise MalformedDataSet("the deflated data set ends before its deflate stream does")
    return inflated


def check_structure(data, implicit_vr: bool, little_endian: bool) -> None:
    """Raise `MalformedDataSet` unless ``data`` (bytes, or a buffer such as a memory-mapped
    file) is a whole data set in this encoding."""
    if not data:
        raise MalformedDataSet("the data set is empty")
    walk = _Walk(data, implicit_vr, little_endian)
    walk.data_set(0, len(data), depth=0, top_level=True)


class _Walk:
    def __init__(self, data, implicit_vr: bool, little_endian: bool) -> None:
        self.data = data
        self.implicit_vr = implicit_vr
        order = "<" if little_endian else ">"
        self.tag = struct.Struct(order + "HH")
        self.implicit_header = struct.Struct(order + "HHI")
        self.short_length = struct.Struct(order + "H")
        self.long_length = struct.Struct(order + "I")

    def data_set(self, offset: int, end: int, depth: int, top_level: bool = False,
                 until_delimiter: bool = False) -> int:
        """Walk the elements from ``offset`` to ``end`` (or to an item delimiter); return where
        the data set ends, delimiter included."""
        if depth > MAX_DEPTH:
            raise MalformedDataSet(f"sequences nested more than {MAX_DEPTH} deep")
        previous = -1
        while offset < end:
            tag, vr, length, value_start = self.element(offset, end)
            if tag == ITEM_DELIMITER:
                if not until_delimiter or length != 0:
                    raise MalformedDataSet(f"misplaced item delimiter at byte {offset}")
                return value_start
            if tag >> 16 == 0xFFFE:
                raise MalformedDataSet(f"misplaced item or delimiter at byte {offset}")
            if top_level and tag <= previous:
                raise MalformedDataSet(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {offset} does not follow "
                    f"({previous >> 16:04X},{previous & 0xFFFF:04X}): tags must ascend")
            previous = tag
            if length == UNDEFINED_LENGTH:
                offset = self.undefined_length_value(tag, vr, value_start, end, depth)
            else:
                if value_start + length > end:
                    raise MalformedDataSet(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {offset} announces {length} bytes, "
                        f"{end - value_start} remain")
                if vr == b"SQ" or (vr is None and _is_sequence(tag)):
                    self.items(value_start, value_start + length, depth + 1, defined=True)
                offset = value_start + length
        if until_delimiter:
            raise MalformedDataSet("an item of undefined length has no item delimiter")
        if offset != end:
            raise MalformedDataSet(f"the data set ends at byte {offset}, not at {end}")
        return offset

    def element(self, offset: int, end: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None in implicit VR, value length, where the value starts)."""
        if offset + 8 > end:
            raise MalformedDataSet(f"an element header at byte {offset} is cut off by the end of the data")
        group, number = self.tag.unpack_from(self.data, offset)
        tag = group << 16 | number
        if group == 0xFFFE or self.implicit_vr:
            _, _, length = self.implicit_header.unpack_from(self.data, offset)
            return tag, None, length, offset + 8
        vr = bytes(self.data[offset + 4:offset + 6])
        if vr in _SHORT_VRS:
            return tag, vr, self.short_length.unpack_from(self.data, offset + 6)[0], offset + 8
        if vr in _LONG_VRS:
            if offset + 12 > end:
                raise MalformedDataSet(f"an element header at byte {offset} is cut off by the end of the data")
            return tag, vr, self.long_length.unpack_from(self.data, offset + 8)[0], offset + 12
        raise MalformedDataSet(
            f"element ({group:04X},{number:04X}) at byte {offset} has no valid VR ({vr!r}): "
            "not explicit VR, as the transfer syntax says")

    def undefined_length_value(self, tag: int, vr: bytes | None, offset: int, end: int, depth: int) -> int:
        """Where a value of undefined length ends: a sequence's items, or encapsulated pixel
        data's fragments, each up to the sequence delimiter."""
        if vr in (None, b"SQ"):
            return self.items(offset, end, depth + 1, defined=False)
        if vr == b"UN":  # a sequence of unknown VR, encoded in implicit VR little endian (PS3.5 6.2.2)
            nested = _Walk(self.data, implicit_vr=True, little_endian=True)
            return nested.items(offset, end, depth + 1, defined=False)
        if vr in (b"OB", b"OW"):
            return self.fragments(offset, end)
        raise MalformedDataSet(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr.decode()} has undefined length")

    def items(self, offset: int, end: int, depth: int, defined: bool) -> int:
        while offset < end:
            tag, _, length, value_start = self.element(offset, end)
            if tag == SEQUENCE_DELIMITER and not defined:
                return value_start
            if tag != ITEM:
                raise MalformedDataSet(f"a sequence holds ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {offset}, not an item")
            if length == UNDEFINED_LENGTH:
                offset = self.data_set(value_start, end, depth, until_delimiter=True)
            else:
                if value_start + length > end:
                    raise MalformedDataSet(f"an item at byte {offset} announces {length} bytes, {end - value_start} remain")
                offset = self.data_set(value_start, value_start + length, depth)
        if not defined:
            raise MalformedDataSet("a sequence of undefined length has no sequence delimiter")
        return offset

    def fragments(self, offset: int, end: int) -> int:
        while offset < end:
            tag, _, length, value_start = self.element(offset, end)
            if tag == SEQUENCE_DELIMITER:
                return value_start
            if tag != ITEM or length == UNDEFINED_LENGTH or value_start + length > end:
                raise MalformedDataSet(f"encapsulated pixel data has a broken fragment at byte {offset}")
            offset = value_start + length
        raise MalformedDataSet("encapsulated pixel data has no sequence delimiter")


@functools.lru_cache(maxsize=4096)
def _is_sequence(tag: int) -> bool:
    """In implicit VR only the dictionary tells a sequence of defined length from a value."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
