"""What the Python suites check of a PNG they made: its signature and size."""
import struct


def png_size(path):
    """(width, height) of the PNG at path; AssertionError when it is not one."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])
