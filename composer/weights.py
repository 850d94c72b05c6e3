"""Safe safetensors I/O: atomic files, validated headers, sharded writing, memory-mapped reading.

The pieces the checkpoint format (composer.checkpoint) and the Hugging Face interop (composer.hf)
share. Nothing here trusts a file: :func:`read_header` parses the 8-byte length and the JSON header
itself and validates every entry against the file size before safetensors memory-maps the file;
:func:`check_tensors` compares names, shapes and dtypes with the model a config describes (built on
the meta device) before any tensor data is read; pickle files are refused with a way to convert them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError, InvalidParameter, Problem

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; real headers are far smaller
DEFAULT_MAX_SHARD_SIZE = "5GB"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), 1)
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), int(_name[1:]) // 8)


def pickle_hint(path: Union[str, Path]) -> str:
    """Why a pickle file is refused and how to convert it."""
    return (
        f"{path} is a pickle-based PyTorch file; composer loads only safetensors, because unpickling can run "
        "arbitrary code. If you trust the file, convert it once:\n"
        "    import torch; from safetensors.torch import save_file\n"
        f"    state = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
        "    save_file({k: v.contiguous() for k, v in state.items()}, 'model.safetensors')\n"
        "For a Hugging Face model folder, convert its weights that way (or with transformers' "
        "save_pretrained(safe_serialization=True)) and run `composer-import <hf dir> <out dir>`."
    )


# ----------------------------------------------------------------------------- atomic files
@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is fsynced and renamed
    over ``path`` (readers see the old file or the new one, never a partial one)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not every platform can fsync a folder
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Union[str, Path]) -> Header:
    """Parse and validate a safetensors header without reading any tensor data.

    Checks the 8-byte length (against MAX_HEADER_BYTES and the file size), that the header is a
    JSON object, every entry's dtype, shape and offsets (inside the file, matching the shape,
    not overlapping, covering the data section exactly). Raises CheckpointError.
    """
    path = Path(path)
    raw, size, n = _read_header_bytes(path)
    header, metadata = _parse_header(path, raw)
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in header.items():
        info = _tensor_info(name, entry, data_size, problems)
        if info is not None:
            tensors[name] = info
    if not problems:
        _check_layout(tensors, data_size, problems)
    if problems:
        raise CheckpointError(f"{path} is corrupt (truncated or damaged): " + "; ".join(problems))
    return Header(path, tensors, metadata)


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """The header's raw bytes, the file's size and the header's length ``n``: the file's start checked (not
    empty, not a pickle), then ``n`` (within MAX_HEADER_BYTES and the file) before anything more is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(9)
            _check_prefix(path, prefix, size)
            (n,) = struct.unpack("<Q", prefix[:8])
            f.seek(8)
            _check_header_length(path, n, size)
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    return raw, size, n


def _check_prefix(path: Path, prefix: bytes, size: int) -> None:
    """Refuse an empty file, one too short for the length field, and a pickle (torch.save's zip or a raw
    pickle), judged by the file's first 9 bytes ``prefix``."""
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was not written completely; save the model again")
    if len(prefix) < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): too short for a safetensors header")
    zipped = prefix.startswith(b"PK\x03\x04")  # torch.save's zip archive
    pickled = prefix[0] == 0x80 and 2 <= prefix[1] <= 5  # a raw pickle (protocol 2-5)
    if (zipped or pickled) and prefix[8:9] != b"{":  # a safetensors header is a JSON object
        raise CheckpointError(pickle_hint(path))


def _check_header_length(path: Path, n: int, size: int) -> None:
    """Refuse a header length ``n`` over MAX_HEADER_BYTES or past the end of a file of ``size`` bytes."""
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {n:,} bytes exceeds the limit of "
            f"{MAX_HEADER_BYTES:,}; the file is corrupt or not a safetensors file"
        )
    if n > size - 8:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header claims {n:,} bytes but the file "
            f"has only {size - 8:,} after the length field"
        )


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The header's tensor entries (a JSON object) and its ``__metadata__`` (strings to strings)."""
    try:
        header = json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({exc}); the file is corrupt or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings")
    return header, metadata


def _check_layout(tensors: dict[str, TensorInfo], data_size: int, problems: list[str]) -> None:
    """The tensors' data, in offset order, must follow each other with no gap or overlap and fill the
    ``data_size`` bytes of the data section exactly; the first problem appended."""
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != cursor:
            problems.append(
                f"{name}: data starts at byte {info.start}, expected {cursor} "
                f"({'overlapping' if info.start < cursor else 'a gap before it'})"
            )
            return
        cursor = info.end
    if cursor != data_size:
        problems.append(f"the tensors cover {cursor:,} bytes of data but the file holds {data_size:,}")


def _tensor_info(name: str, entry: Any, data_size: int, problems: list[str]) -> Optional[TensorInfo]:
    if not isinstance(entry, dict):
        problems.append(f"{name}: header entry is not an object")
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        problems.append(f"{name}: unknown dtype {dtype!r}")
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        problems.append(f"{name}: invalid shape {shape!r}")
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        problems.append(f"{name}: invalid data_offsets {offsets!r}")
        return None
    start, end = offsets
    if not 0 <= start <= end:
        problems.append(f"{name}: invalid data_offsets {offsets}")
        return None
    if end > data_size:
        problems.append(f"{name}: data_offsets {offsets} run past the end of the data ({data_size:,} bytes)")
        return None
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if end - start != nbytes:
        problems.append(f"{name}: data_offsets {offsets} span {end - start} bytes but {dtype}{shape} needs {nbytes}")
        return None
    return TensorInfo(dtype, tuple(shape), start, end)


def safetensors_name(dtype: torch.dtype) -> str:
    for name, (dt, _) in DTYPES.items():
        if dt == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


# ----------------------------------------------------------------------------- writing
def parse_size(value: Union[int, str], name: str = "max_shard_size") -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``1000`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not m or float(m.group(1)) <= 0:
        raise InvalidParameter([Problem(name, f"{value!r} is not a size", "use bytes (an int) or e.g. '5GB', '500MB'")])
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each shared tensor once, under its first name (tied heads drop out)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach()
    return out


def write_safetensors(
    tensors: Mapping[str, Tensor],
    directory: Path,
    max_shard_size: Union[int, str],
    metadata: Mapping[str, str],
    index_metadata: Optional[Mapping[str, Any]] = None,
) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or, past ``max_shard_size``, as shards plus an
    index (the Hugging Face layout). Stale weight files of the other layout are removed after the
    new ones are in place. Returns the written files."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for shard, fname in zip(shards, names, strict=True):
        with atomic_path(directory / fname) as tmp:
            save_file(shard, str(tmp), metadata=dict(metadata))
        written.append(directory / fname)
    if n > 1:
        index = {
            "metadata": {
                **(index_metadata or {}),
                "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
            },
            "weight_map": {k: fname for shard, fname in zip(shards, names, strict=True) for k in shard},
        }
        atomic_write(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX_NAME)
    stale = [
        p
        for p in directory.iterdir()
        if (p.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(p.name)) and p not in written
    ]
    for p in sorted(stale, key=lambda p: p.name != INDEX_NAME):  # the index first: it points at shards
        p.unlink()
    return written


# ----------------------------------------------------------------------------- output folders
OUTPUT_NAMES = ("config.json", "tokenizer.json", "generation_config.json", INDEX_NAME)  # + *.safetensors


def _ours(path: Path) -> bool:
    return path.name in OUTPUT_NAMES or path.suffix == ".safetensors"


def _overlap(target: Path, source: Path) -> Optional[str]:
    if target == source:
        return "is the source folder"
    if source in target.parents:
        return f"is inside the source folder {source}"
    if target in source.parents:
        return f"contains the source {source}"
    return None


def check_output_folder(
    target: Union[str, Path],
    sources: tuple = (),
    overwrite: bool = False,
    replaceable: Any = None,
    option: str = "overwrite=True",
) -> Path:
    """Refuse to write a checkpoint into ``target`` where that could lose data: never over or around a
    ``source`` (whatever ``overwrite`` says), and not over files of another checkpoint unless ``overwrite``
    (``replaceable(target)`` True: the folder holds this same model, e.g. a re-save after training).
    Files that are not a checkpoint's (notes, logs) are never touched."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder; a checkpoint is written as a folder")
    resolved = target.resolve()
    for source in sources:
        why = _overlap(resolved, Path(source).expanduser().resolve())
        if why:
            raise CheckpointError(
                f"the output folder {target} {why}; writing there would overwrite the model being "
                "read. Write to another folder"
            )
    existing = sorted(p.name for p in target.iterdir() if _ours(p)) if target.is_dir() else []
    if existing and not overwrite and not (replaceable is not None and replaceable(target)):
        raise CheckpointError(
            f"{target} already holds a checkpoint ({', '.join(existing[:4])}); refusing to "
            f"overwrite it. Write to an empty folder, or pass {option} to replace it"
        )
    return target


# ----------------------------------------------------------------------------- reading
MAX_JSON_DEPTH = 64  # nesting of any JSON document read (configs, headers, indexes): real ones use < 10


def json_loads(text: Any) -> Any:
    """``json.loads`` with the nesting bounded: ValueError for a document nested deeper than MAX_JSON_DEPTH
    (which would otherwise overflow the parser's or a later reader's recursion)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return value


def index_files(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names (each must exist beside it)."""
    try:
        data = json_loads(index.read_text())
    except (OSError, ValueError):
        data = None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index} is not a valid shard index (a JSON object with a 'weight_map' of tensor name -> file)"
        )
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"{index} lists shard {name!r}, which is missing from {index.parent}")
        files.append(f)
    return files


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of what a checkpoint of ``model`` holds (tied weights once)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in unique_state(model).items()}


def check_tensors(
    found: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    dtype: Optional[torch.dtype],
    where: str,
    hint: str = "",
) -> None:
    """Compare header entries with the model's tensors; one CheckpointError listing every problem.
    ``dtype``: the dtype every floating tensor must have (None: any floating dtype)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    lines = []
    if missing:
        lines.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        lines.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name, (shape, want_dtype) in expected.items():
        info = found.get(name)
        if info is None:
            continue
        if info.shape != shape:
            lines.append(f"{name}: shape {list(info.shape)} in the file, the config needs {list(shape)}")
        got = info.torch_dtype
        if want_dtype.is_floating_point:
            if not got.is_floating_point:
                lines.append(f"{name}: dtype {info.dtype}, expected a floating-point dtype")
            elif dtype is not None and got != dtype:
                lines.append(f"{name}: dtype {info.dtype}, the checkpoint says {str(dtype).removeprefix('torch.')}")
        elif got != want_dtype:
            lines.append(f"{name}: dtype {info.dtype}, expected {safetensors_name(want_dtype)}")
    if lines:
        body = "\n".join(f"  - {line}" for line in lines)
        raise CheckpointError(
            f"{where} does not match its model config ({len(lines)} problems):\n{body}" + (f"\n{hint}" if hint else "")
        )


def open_safetensors(path: Path, device: str) -> Any:
    """safetensors' memory-mapped reader, its errors turned into CheckpointError."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # SafetensorError and OSError from the Rust side
        raise CheckpointError(f"cannot open {path}: {exc}") from None


def materialize(model: nn.Module, state: dict[str, Tensor], device: Union[str, torch.device]) -> nn.Module:
    """Assign ``state`` into a meta-built model (no copy, no init), re-tie, fill the buffers."""
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"weights left unset after loading: {', '.join(left)}")
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model
