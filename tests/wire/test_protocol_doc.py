"""protocol.md and the code must agree.

Every ```hex block in protocol.md is one whole frame (4-byte length prefix plus
CBOR) whose first line is ``# <the frame in CBOR diagnostic notation>``.  The
blocks are read here with the shared codec (``client.wire``), so an example
that drifts from the codec fails the build, in the manner of h11's
tests/test_io.py (a table of exact bytes, read both ways, byte by byte).

To write a new example, let the codec make the bytes:

    .venv/bin/python tests/wire/test_protocol_doc.py '[2, 7, "emails", b"hi", None, 0, None]'

prints the block to paste (the argument is a Python literal).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python tests/wire/test_protocol_doc.py …` works too
    sys.path.insert(0, str(ROOT))

from broker.handlers.admin import COMMANDS  # noqa: E402
from client.wire import CLIENT_OPS, ERROR_CODES, SERVER_OPS, FrameReader, encode  # noqa: E402

DOC = ROOT / "protocol.md"
KNOWN_OPS = {**CLIENT_OPS, **SERVER_OPS}
BLOCK = re.compile(r"^```hex\n(.*?)^```", re.M | re.S)


# --- reading the document -------------------------------------------------------------
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, number: int) -> str:
    """The body of top-level section ``## <number>. …``, up to the next ``## ``."""
    m = re.search(rf"^## {number}\. .*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"protocol.md has no section '## {number}. …'"
    return m.group(1)


def hex_blocks(text: str) -> list[tuple[int, str, bytes]]:
    """(line number, diagnostic comment, bytes) for every ```hex block."""
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        lines = m.group(1).splitlines()
        assert lines and lines[0].startswith("# "), (
            f"protocol.md line {line}: a hex block must start with '# <diagnostic notation>'"
        )
        digits = " ".join(raw.split("#", 1)[0] for raw in lines[1:])
        tokens = digits.split()
        assert all(re.fullmatch(r"[0-9a-f]{2}", t) for t in tokens), (
            f"protocol.md line {line}: bytes must be two lower-case hex digits separated by spaces"
        )
        out.append((line, lines[0][2:].strip(), bytes.fromhex("".join(tokens))))
    return out


def diagnostic(v) -> str:
    """CBOR diagnostic notation (RFC 8949 §8) as protocol.md writes it."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (bytes, bytearray)):
        return "h'" + bytes(v).hex() + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(diagnostic(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no diagnostic notation for {type(v).__name__}")


def hex_block(frame) -> str:
    """The ```hex block protocol.md uses for ``frame``."""
    data = encode(frame)
    lines = ["```hex", "# " + diagnostic(frame), " ".join(f"{b:02x}" for b in data[:4])]
    body = data[4:]
    lines += [" ".join(f"{b:02x}" for b in body[i : i + 16]) for i in range(0, len(body), 16)]
    return "\n".join(lines + ["```"])


def decode_one(data: bytes) -> list:
    reader = FrameReader(max_frame=1 << 30)
    reader.feed(data)
    frames = reader.frames()
    assert len(frames) == 1 and reader.buffered == 0, f"{len(frames)} frames, {reader.buffered} bytes left over"
    return frames[0]


EXAMPLES = hex_blocks(doc_text()) if DOC.exists() else []


# --- the examples ------------------------------------------------------------------
def test_protocol_md_has_hex_examples():
    assert DOC.exists(), "protocol.md is missing"
    assert len(EXAMPLES) >= len(KNOWN_OPS)


@pytest.mark.parametrize("line, diag, data", EXAMPLES, ids=[f"line{e[0]}" for e in EXAMPLES])
def test_each_hex_example_is_exactly_one_frame_that_the_codec_writes_the_same_way(line, diag, data):
    frame = decode_one(data)
    assert encode(frame) == data, f"line {line}: client.wire.encode writes this frame differently"
    assert frame[0] in KNOWN_OPS, f"line {line}: op code {frame[0]} is in neither CLIENT_OPS nor SERVER_OPS"
    assert diagnostic(frame) == diag, f"line {line}: the comment does not match the bytes"


@pytest.mark.parametrize("line, diag, data", EXAMPLES, ids=[f"line{e[0]}" for e in EXAMPLES])
def test_each_hex_example_reads_the_same_when_fed_one_byte_at_a_time(line, diag, data):
    reader = FrameReader(max_frame=1 << 30)
    frames = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        frames += reader.frames()
    assert frames == [decode_one(data)]


def test_every_op_code_has_at_least_one_hex_example():
    shown = {decode_one(data)[0] for _, _, data in EXAMPLES}
    missing = {code: name for code, name in KNOWN_OPS.items() if code not in shown}
    assert not missing, f"protocol.md has no hex example for {missing}"


def test_every_client_op_and_deliver_has_its_own_section_under_operations():
    ops = section(doc_text(), 5)
    headings = set(re.findall(r"^### 5\.\d+ ([A-Z_]+)\s*$", ops, re.M))
    wanted = set(CLIENT_OPS.values()) | {"DELIVER"}
    assert wanted <= headings, f"no '### 5.n NAME' section for {sorted(wanted - headings)}"


def test_plain_hex_examples_are_laid_out_as_the_helper_writes_them():
    # Blocks with comments beside their bytes (the annotated dump of §3.1) are exempt.
    for m in BLOCK.finditer(doc_text()):
        lines = m.group(1).splitlines()
        if any("#" in raw for raw in lines[1:]):
            continue
        block = "```hex\n" + m.group(1) + "```"
        _, _, data = hex_blocks(block + "\n")[0]
        assert block == hex_block(decode_one(data)), block


# --- the error table and the admin commands ---------------------------------------
def error_table(text: str) -> dict[str, str]:
    """code -> the 'connection' cell, from the one table of section 4."""
    rows = re.findall(r"^\| `([A-Z_]+)` \|[^|]*\| ([^|]*) \|[^|]*\|\s*$", section(text, 4), re.M)
    return {code: cell.strip() for code, cell in rows}


def test_every_error_code_is_in_the_error_table_and_nothing_else_is():
    table = error_table(doc_text())
    assert set(table) == set(ERROR_CODES), (
        f"missing from protocol.md §4: {sorted(set(ERROR_CODES) - set(table))}; "
        f"not in client.wire.ERROR_CODES: {sorted(set(table) - set(ERROR_CODES))}"
    )


def test_the_error_table_says_which_errors_keep_the_connection_open_as_the_codec_does():
    for code, cell in error_table(doc_text()).items():
        stays_open = ERROR_CODES[code][1]
        assert cell.startswith("stays open" if stays_open else "closed"), (code, cell)


def test_every_admin_command_has_its_own_section_and_row():
    admin = section(doc_text(), 7)
    headings = set(re.findall(r"^### `([A-Z-]+)[^`]*`\s*$", admin, re.M))
    rows = set(re.findall(r"^\| `([A-Z-]+)[^`]*` \|", admin, re.M))
    assert headings == set(COMMANDS), (
        f"undocumented admin commands: {sorted(set(COMMANDS) - headings)}; "
        f"documented but unknown: {sorted(headings - set(COMMANDS))}"
    )
    assert rows == set(COMMANDS), f"the admin command table lists {sorted(rows)}"


if __name__ == "__main__":
    import ast

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/wire/test_protocol_doc.py '<a frame as a Python literal>'")
    print(hex_block(ast.literal_eval(sys.argv[1])))
