"""Reading a large AgentMessage a piece at a time, so that no single parse holds the event loop.

Parsing costs per entry, not per byte of meaning: a report of an agent serving 128 ranks may take 4 MB, and
4 MB of empty loads (or of empty GPU devices in one load) hold the loop for a quarter of a second in one parse.
A message above PIECE_BYTES is walked at its top level instead: a report naming more loads or failed ranks than
its agent serves, a load larger than any valid one, or more fields than a valid report holds, is refused before
anything is parsed; its loads are then parsed one by one, the loop served between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loadagg.server.validation import MAX_RANK_LOAD_BYTES
from loadagg.v1 import loadagg_pb2 as pb

# Parsed in one go below this (a few ms at most, whatever the entries); walked above it.
PIECE_BYTES = 64 * 1024
_REPORT = pb.AgentMessage.DESCRIPTOR.fields_by_name["report"].number
_LOADS = pb.LoadReport.DESCRIPTOR.fields_by_name["loads"].number
_FAILED = pb.LoadReport.DESCRIPTOR.fields_by_name["failed_ranks"].number
# Besides a report: a hello's bytes (each rank a varint of up to 11 bytes with its tag, and room for its labels).
# In a report, packed failed ranks take at most 11 bytes a rank; other fields (the error string) cost their
# parse little whatever their size. And how many fields a message may hold besides one per served rank (the
# walk costs per field: a message of a million tiny unknown fields stops here rather than at its end).
_BYTES_PER_RANK = 11
_HELLO_BYTES = 72 * 1024  # at least what max_hello_bytes allows besides the ranks (labels, and 64 KiB of room)
_OTHER_FIELDS = 64


class TooLarge(ValueError):
    """The message holds more than its link may send; the reason says what."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, start, end) of each top-level field of `buf`; a malformed one raises ValueError."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end")
        yield key >> 3, start, pos


def _payload(buf: memoryview, start: int) -> memoryview:
    """The bytes of the length-delimited field starting at `start` (its key and length skipped)."""
    _, pos = _varint(buf, start)
    size, pos = _varint(buf, pos)
    return buf[pos:pos + size]


async def parse_agent_message(raw: bytes, most_loads: int, parse: Callable[[bytes], pb.AgentMessage]
                              ) -> pb.AgentMessage:
    """`raw` parsed, a load at a time when it is large; TooLarge when it names more than `most_loads` loads or
    carries more besides them than a report of that many ranks; ValueError (or DecodeError) when malformed."""
    if len(raw) <= PIECE_BYTES:
        return parse(raw)
    buf = memoryview(raw)
    top = bytearray()
    report: list[memoryview] = []
    top_most = _HELLO_BYTES + most_loads * _BYTES_PER_RANK
    fields_most = _OTHER_FIELDS + most_loads
    for fields, (number, start, end) in enumerate(_fields(buf)):
        if fields > fields_most:
            raise TooLarge(f"more than {fields_most} fields")
        if number == _REPORT and buf[start] & 7 == 2:
            report.append(_payload(buf, start))
        else:
            top += buf[start:end]
            if len(top) > top_most:
                raise TooLarge(f"more than {top_most} bytes besides its report")
    loads: list[memoryview] = []
    rest = bytearray()
    fields = 0
    failed_most = most_loads * _BYTES_PER_RANK
    for part in report:  # (a repeated message field is merged, as a parser would)
        for number, start, end in _fields(part):
            fields += 1
            if fields > fields_most + most_loads:
                raise TooLarge(f"more than {fields_most + most_loads} fields in its report")
            if number == _LOADS and part[start] & 7 == 2:
                loads.append(load := _payload(part, start))
                if len(load) > MAX_RANK_LOAD_BYTES:
                    raise TooLarge(f"a load of {len(load)} bytes (a rank's takes at most {MAX_RANK_LOAD_BYTES})")
                if len(loads) > most_loads:
                    raise TooLarge(f"more than {most_loads} loads (its agent serves {most_loads} ranks)")
            else:
                if number == _FAILED and part[start] & 7 == 2 and len(_payload(part, start)) > failed_most:
                    raise TooLarge(f"failed ranks packed in more than {failed_most} bytes")
                rest += part[start:end]
    message = parse(bytes(top))
    if report:
        message.report.MergeFromString(bytes(rest))
        parsed = 0
        for load in loads:
            if parsed >= PIECE_BYTES:  # let the loop serve others between pieces
                await asyncio.sleep(0)
                parsed = 0
            message.report.loads.add().MergeFromString(bytes(load))
            parsed += len(load)
    return message
