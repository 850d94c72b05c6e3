"""Local UTF-8 text: one file or a folder of files (sorted by name, concatenated), read in blocks.

The corpus is one byte stream (the files end to end). It is split into training and validation
at a byte offset: the first ``1 - val_fraction`` of the bytes (moved forward to a character
boundary) train, the rest validate. ``composer-prepare`` and the ``text`` data module use the
same split, so their tokens agree. Text is decoded strictly; a bad byte is a DataError naming the
file and the byte offset in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

BLOCK_BYTES = 1 << 20  # bytes read at a time


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF  # 10xxxxxx: inside a multi-byte UTF-8 character


@dataclass(frozen=True)
class Corpus:
    """The files of a text source with their sizes; offsets are into their concatenation."""

    root: Path
    files: tuple[Path, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def open(path: str | Path, key: str = "data.path") -> Corpus:
        """List the files at ``path`` (a file, or a folder searched recursively, hidden files skipped)."""
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(
                f"{root}: no such file or folder ({key}); point {key} at a UTF-8 text file or a folder of them"
            )
        if root.is_dir():
            files = sorted(
                (p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root))),
                key=lambda p: p.relative_to(root).as_posix(),
            )
            sizes = tuple(p.stat().st_size for p in files)
            if sum(sizes) == 0:
                raise DataError(
                    f"{root}: the folder has no text ({'only empty files' if files else 'no files'}); "
                    f"put UTF-8 text files in it or point {key} at another path"
                )
        else:
            files, sizes = [root], (root.stat().st_size,)
            if sizes[0] == 0:
                raise DataError(f"{root}: the file is empty; point {key} at a file with text in it")
        return Corpus(root, tuple(files), sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> list[list]:
        """(name, size, mtime_ns) of each file: changes when the input changes."""
        return [[str(p.resolve()), n, p.stat().st_mtime_ns] for p, n in zip(self.files, self.sizes, strict=True)]

    def split_offset(self, val_fraction: float) -> int:
        """Byte offset where validation starts: ``(1 - val_fraction)`` of the bytes, at a character boundary."""
        offset = int(self.total_bytes * (1.0 - val_fraction))
        while 0 < offset < self.total_bytes and _is_continuation(self._byte_at(offset)):
            offset += 1
        return offset

    def _byte_at(self, offset: int) -> int:
        for path, start, size in self._spans():
            if start <= offset < start + size:
                with open(path, "rb") as f:
                    f.seek(offset - start)
                    return f.read(1)[0]
        raise IndexError(offset)

    def _spans(self) -> Iterator[tuple[Path, int, int]]:
        start = 0
        for path, size in zip(self.files, self.sizes, strict=True):
            yield path, start, size
            start += size

    def iter_text(
        self, start: int = 0, end: int | None = None, block_bytes: int = BLOCK_BYTES
    ) -> Iterator[tuple[str, int]]:
        """Decoded text of bytes ``[start, end)`` in blocks: yields (text, byte offset just after it).

        ``start`` and ``end`` must be character boundaries (0, the total, or a ``split_offset``).
        """
        end = self.total_bytes if end is None else end
        for path, fstart, size in self._spans():
            lo, hi = max(start, fstart), min(end, fstart + size)
            if lo >= hi:
                continue
            with open(path, "rb") as f:
                f.seek(lo - fstart)
                pos, pending = lo, b""  # pos: file-stream offset of the first byte of `pending`
                while pos + len(pending) < hi:
                    data = pending + f.read(min(block_bytes, hi - pos - len(pending)))
                    cut = len(data)
                    if pos + cut < hi:  # keep an unfinished character for the next block
                        back = 0
                        while back < min(3, cut) and _is_continuation(data[cut - 1 - back]):
                            back += 1
                        lead = cut - 1 - back
                        if lead >= 0 and back + 1 < _char_length(data[lead]):
                            cut = lead  # a character that continues in the next block
                    text = decode_utf8(data[:cut], path, pos - fstart)
                    pending = data[cut:]
                    pos += cut
                    yield text, pos
                if pending:
                    yield decode_utf8(pending, path, pos - fstart), pos + len(pending)

    def read_text(self, start: int = 0, end: int | None = None) -> str:
        return "".join(text for text, _ in self.iter_text(start, end))


def _char_length(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with ``lead`` (1 for ASCII and for invalid bytes)."""
    return 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_text_file(path: str | Path, key: str = "data.path") -> str:
    """The whole text of one UTF-8 file; DataError if it is missing, a folder, empty or not UTF-8."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file ({key}); point {key} at an existing file")
    if not path.is_file():
        raise DataError(f"{path}: is a folder, not a file ({key}); point {key} at one file")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path}: the file is empty; point {key} at a file with data in it")
    return decode_utf8(data, path)


def decode_utf8(data: bytes, path: Path, file_offset: int = 0) -> str:
    """``data`` (read from ``path`` at ``file_offset``) as text; DataError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = file_offset + exc.start
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {at} (byte 0x{data[exc.start]:02x}); convert the "
            "file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it"
        ) from None
