"""The checkpoint format: safetensors weights + the resolved model config, loaded safely.

    model.save_pretrained("ckpt/", tokenizer=tok)     # ckpt/model.safetensors, config.json, tokenizer.json
    model = ComposedModel.from_pretrained("ckpt/")    # or a lone "ckpt/model.safetensors"

A checkpoint folder holds

- ``model.safetensors``, or past ``max_shard_size`` the shards ``model-00001-of-0000N.safetensors``
  and ``model.safetensors.index.json`` ({"metadata": {...}, "weight_map": {name: shard}});
- ``config.json``: ``{"format_version": "1.0", "library": "composer", "dtype": "float32",
  "model": <ModelConfig.to_dict()>}``;
- ``tokenizer.json`` when a tokenizer was given.

Every safetensors header carries the same config document (metadata key ``composer_config``), so
a lone file is self-describing. Tied weights are stored once (under the first name). Files are
written atomically (temporary file in the same folder, fsync, rename).

Loading reads only safetensors (pickle files are refused: unpickling can run code), parses and
validates each header itself (length limit, JSON, dtypes, shapes, offsets against the file size)
before safetensors memory-maps the file, checks every tensor's name, shape and dtype against the
model the config describes (built on the meta device) before any data is read, and reports every
mismatch in one :class:`~composer.errors.CheckpointError`. Weights are assigned straight into the
meta-built model, so there is one copy of them (on CPU the memory-mapped file itself, paged in on
first use and copied on write) and no initialisation work.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .contract.registry import untrusted_config
from .devices import target_device, target_dtype
from .errors import CheckpointError, ConfigError, IncompatibleVersion, ModelError
from .weights import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    Header,
    TensorInfo,
    atomic_write,
    check_output_folder,
    check_tensors,
    expected_tensors,
    index_files,
    json_loads,
    materialize,
    open_safetensors,
    parse_size,
    pickle_hint,
    read_header,
    unique_state,
    write_safetensors,
)

log = logging.getLogger("composer")

FORMAT_VERSION = "1.0"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
METADATA_KEY = "composer_config"  # safetensors header metadata holding the config document


# ----------------------------------------------------------------------------- saving
def config_document(model: nn.Module) -> dict[str, Any]:
    """What config.json (and every header) holds for ``model``."""
    dtypes = {p.dtype for p in model.parameters()}
    return {
        "format_version": FORMAT_VERSION,
        "library": "composer",
        "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None,
        "model": model.config.to_dict(),
    }


def save_pretrained(
    model: nn.Module,
    directory: Union[str, Path],
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``directory`` (created if needed): weights, config.json, tokenizer.json.

    tokenizer:      a ``tokenizers.Tokenizer`` (or anything with ``to_str()``), saved as tokenizer.json
    max_shard_size: bytes or a string like "5GB"; larger checkpoints are sharded with an index
    overwrite:      replace a different checkpoint already in ``directory`` (a re-save of the same model
                    architecture, e.g. after more training, needs no flag)
    Returns the directory.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves as the model itself
    parse_size(max_shard_size)  # a bad size fails before anything is written
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a folder; save_pretrained writes a folder")
    check_output_folder(directory, overwrite=overwrite, replaceable=lambda d: _holds(d, model))
    if tokenizer is not None and not callable(getattr(tokenizer, "to_str", None)):
        raise ModelError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    _check_describes(model)
    directory.mkdir(parents=True, exist_ok=True)
    doc = config_document(model)
    meta = {"format": "pt", "format_version": FORMAT_VERSION, METADATA_KEY: json.dumps(doc)}
    write_safetensors(unique_state(model), directory, max_shard_size, meta, {"format_version": FORMAT_VERSION})
    atomic_write(directory / CONFIG_NAME, json.dumps(doc, indent=2) + "\n")
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER_NAME, tokenizer.to_str())
    return directory


def _holds(directory: Path, model: nn.Module) -> bool:
    """Whether ``directory`` holds a composer checkpoint of this same model architecture."""
    try:
        doc = json_loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("library") == "composer" and doc.get("model") == model.config.to_dict()


def _check_describes(model: nn.Module) -> None:
    """Refuse to save a model whose weights its config does not describe (hand-made modules)."""
    if not hasattr(model, "config") or not callable(getattr(type(model), "on_meta", None)):
        raise ModelError(f"save_pretrained needs a ComposedModel, got {type(model).__name__}")
    want = {k: tuple(v.shape) for k, v in unique_state(_meta_model(type(model), model.config)).items()}
    have = {k: tuple(v.shape) for k, v in unique_state(model).items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise CheckpointError(
            "the model's weights differ from what its config describes (hand-made modules "
            f"from ModelBuilder?): {', '.join(diff[:8])}; from_pretrained could not rebuild it. "
            "Save such a model's state_dict yourself with safetensors.torch.save_file"
        )


def save_tokenizer(tokenizer: Any, directory: Union[str, Path]) -> None:
    atomic_write(Path(directory) / TOKENIZER_NAME, tokenizer.to_str())


def load_tokenizer(path: Union[str, Path]) -> Any:
    """The ``tokenizers.Tokenizer`` saved beside a checkpoint (folder or weights file), or None."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / TOKENIZER_NAME
    if not file.is_file():
        return None
    from tokenizers import Tokenizer  # late: 0.3 s to import, and only a saved tokenizer needs it

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{file} is not a valid tokenizers file: {exc}") from None


# ----------------------------------------------------------------------------- config versions
def _version(text: Any, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.\d+)?", str(text).strip())
    if not m:
        raise CheckpointError(f"{where}: format_version {text!r} is not a version like '1.0'")
    return int(m.group(1)), int(m.group(2) or 0)


# Format 0.x (composer before 0.1) stored the model options at the top level of config.json, beside
# format_version, with nanoGPT's names for the sizes.
_RENAMED_0X = {
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "hidden_size",
    "block_size": "max_position_embeddings",
}


def _migrate_0_to_1(doc: dict) -> dict:
    model = {_RENAMED_0X.get(k, k): v for k, v in doc.items() if k not in ("format_version", "dtype")}
    return {"format_version": "1.0", "library": "composer", "dtype": doc.get("dtype"), "model": model}


_MIGRATIONS = {0: _migrate_0_to_1}  # major version -> step to the next major


def migrate(doc: Any, where: str) -> dict:
    """Bring a config document to the current format (logging a note per step); refuse newer majors."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if "format_version" not in doc:
        if "model_type" in doc:
            raise CheckpointError(
                f"{where} is a Hugging Face config (model_type {doc['model_type']!r}), not a "
                "composer checkpoint; convert the folder with `composer-import <hf dir> <out dir>` "
                "or composer.hf.import_hf"
            )
        doc = {**doc, "format_version": "0.0"}
    current = _version(FORMAT_VERSION, "composer")
    found = _version(doc["format_version"], where)
    if found[0] > current[0]:
        raise IncompatibleVersion(
            f"{where}: checkpoint format version {doc['format_version']} is newer than this "
            f"code reads (format {current[0]}.x, version {FORMAT_VERSION}); upgrade composer "
            "to load it"
        )
    while found[0] < current[0]:
        old = doc["format_version"]
        doc = _MIGRATIONS[found[0]](doc)
        log.warning(
            "%s: migrated the checkpoint config from format %s to %s (re-save with save_pretrained to update the file)",
            where,
            old,
            doc["format_version"],
        )
        found = _version(doc["format_version"], where)
    if found > current:
        log.info(
            "%s: format %s is newer than %s; reading it as %s",
            where,
            doc["format_version"],
            FORMAT_VERSION,
            FORMAT_VERSION,
        )
    if not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{where}: no 'model' section holding the model config")
    return doc


# ----------------------------------------------------------------------------- locating
@dataclass
class _Checkpoint:
    files: list[Path]
    headers: list[Header]
    doc: dict
    source: str  # where the config came from


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder or a lone file (pickles refused)."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(pickle_hint(path))
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file; pass a checkpoint folder or its model.safetensors"
            )
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a folder written by save_pretrained or a .safetensors file")
    if (path / INDEX_NAME).is_file():
        return index_files(path / INDEX_NAME)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(pickle_hint(pickles[0]))
    raise CheckpointError(
        f"{path} holds no {WEIGHTS_NAME} (nor {INDEX_NAME}); pass a folder written by save_pretrained"
    )


def _locate(path: Union[str, Path]) -> _Checkpoint:
    path = Path(path)
    files = _weight_files(path)
    headers = [read_header(f) for f in files]
    folder = path if path.is_dir() else path.parent
    beside = folder / CONFIG_NAME
    in_header = next((h for h in headers if METADATA_KEY in h.metadata), None)
    doc, source = None, ""
    if path.is_dir() and beside.is_file() or in_header is None and beside.is_file():
        source = str(beside)
        try:
            doc = json_loads(beside.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{beside} is not valid JSON ({exc})") from None
    elif in_header is not None:
        source = f"{in_header.path} (header metadata)"
        try:
            doc = json_loads(in_header.metadata[METADATA_KEY])
        except ValueError as exc:
            raise CheckpointError(f"{source}: '{METADATA_KEY}' is not valid JSON ({exc})") from None
    else:
        raise CheckpointError(
            f"no model config for {path}: neither {beside} nor a '{METADATA_KEY}' entry in the "
            "safetensors header; save with save_pretrained, or put the config.json it was "
            "saved with beside the weights"
        )
    return _Checkpoint(files, headers, migrate(doc, source), source)


# ----------------------------------------------------------------------------- loading
def _meta_model(model_class: type, config: Any) -> nn.Module:
    return model_class.on_meta(config)


def _build(model_class: type, doc: dict, source: str, trust_plugins: Iterable[str] = ()) -> nn.Module:
    """The saved model, built on the meta device (validated once; nothing allocated). A dotted-path plugin
    the config names is imported only if ``trust_plugins`` allows it (composer.contract.registry)."""
    try:
        with untrusted_config(source, trust_plugins):
            return _meta_model(model_class, doc["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the saved model config is invalid: {exc}") from None


def _torch_dtype(name: Any, where: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dt


def from_pretrained(
    path: Union[str, Path],
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    *,
    model_class: type,
    trust_plugins: Iterable[str] = (),
) -> nn.Module:
    """Rebuild the model saved in ``path`` (a save_pretrained folder or a lone .safetensors file).

    device: where the weights go (default CPU); they are read memory-mapped straight there
    dtype:  cast floating weights to this dtype (default: as saved, bit-exact)
    trust_plugins: packages / modules whose dotted-path components the saved config may name (refused
            otherwise: loading never imports a module you did not choose)
    Returns the ComposedModel in eval mode. Raises CheckpointError (IncompatibleVersion for a
    newer major format) naming every problem.
    """
    dev, dtype = str(target_device(device)), target_dtype(dtype)
    ckpt = _locate(path)
    saved_dtype = _torch_dtype(ckpt.doc.get("dtype"), ckpt.source)
    model = _build(model_class, ckpt.doc, ckpt.source, trust_plugins)
    found: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for h in ckpt.headers:
        for name, info in h.tensors.items():
            if name in found:
                raise CheckpointError(f"tensor {name} appears in both {owner[name]} and {h.path}")
            found[name], owner[name] = info, h.path
    check_tensors(found, expected_tensors(model), saved_dtype, str(path))
    state: dict[str, Tensor] = {}
    for f in ckpt.files:
        reader = open_safetensors(f, dev)
        try:
            names = reader.keys()  # a safe_open handle is not iterable
            for name in names:
                t = reader.get_tensor(name)
                state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except Exception as exc:  # a file changed or damaged after its header was checked
            raise CheckpointError(f"cannot read {f}: {exc}") from None
    return materialize(model, state, dev).eval()


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a model class with a ``config`` and a classmethod
    ``on_meta(config)`` that builds it on the meta device (``ComposedModel``): the checkpoint format
    sits below the model, which inherits these methods (as transformers' models do)."""

    def save_pretrained(self, directory: Any, tokenizer: Any = None, **kwargs: Any) -> Path:
        """Write weights (safetensors), config and tokenizer to ``directory`` (composer.checkpoint)."""
        return save_pretrained(self, directory, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: Any, **kwargs: Any) -> Any:
        """Rebuild a model saved with ``save_pretrained`` (composer.checkpoint)."""
        return from_pretrained(directory, model_class=cls, **kwargs)
