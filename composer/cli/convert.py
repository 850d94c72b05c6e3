"""composer-import / composer-export: convert between Hugging Face model folders and composer checkpoints.

    composer-import <hf dir> <out dir> [--dtype bfloat16] [--max-shard-size 5GB]
    composer-export <model dir> <hf dir> [--dtype bfloat16] [--max-shard-size 5GB]

composer-import reads a local Hugging Face folder (config.json + *.safetensors; GPT-2, Llama,
Mistral, Qwen2, GPT-NeoX) and writes a composer checkpoint (save_pretrained), copying tokenizer.json.
composer-export writes a folder transformers.AutoModelForCausalLM.from_pretrained loads, with the
checkpoint's tokenizer.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import load_tokenizer
from ..errors import InvalidParameter, Problem
from ..hf import export_hf, import_hf
from ..model import ComposedModel
from ..weights import atomic_write, check_output_folder
from . import run

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    """argparse that raises (one message from the CLI wrapper) instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        usage = self.format_usage().strip().removeprefix("usage: ")
        raise InvalidParameter([Problem("arguments", message, f"usage: {usage}")])


def _parser(prog: str, source: str, target: str, help_text: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=help_text)
    p.add_argument("source", help=source)
    p.add_argument("target", help=target)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (default 5GB)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already in the output folder (never the source)"
    )
    p.add_argument(
        "--trust-plugin",
        action="append",
        default=[],
        metavar="PKG",
        help="let the checkpoint's config name components of this package by import path (repeatable)",
    )
    return p


def _args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return p.parse_args(argv)  # bad usage raises InvalidParameter (_Parser.error); --help exits 0


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return DTYPES[name] if name else None


def import_main(argv: list[str]) -> int:
    args = _args(
        _parser(
            "composer-import",
            "Hugging Face model folder",
            "output checkpoint folder",
            "Convert a Hugging Face model folder to a composer checkpoint.",
        ),
        argv,
    )
    check_output_folder(args.target, (args.source,), args.overwrite, option="--overwrite")
    model = import_hf(args.source, dtype=_dtype(args.dtype))
    model.save_pretrained(args.target, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    tokenizer = Path(args.source) / "tokenizer.json"
    if tokenizer.is_file():
        atomic_write(Path(args.target) / "tokenizer.json", tokenizer.read_bytes())
    print(f"imported {model.config.name} ({model.num_parameters():,} parameters) to {args.target}")
    return 0


def export_main(argv: list[str]) -> int:
    args = _args(
        _parser(
            "composer-export",
            "composer checkpoint folder",
            "output Hugging Face folder",
            "Convert a composer checkpoint to a Hugging Face model folder.",
        ),
        argv,
    )
    model = ComposedModel.from_pretrained(args.source, dtype=_dtype(args.dtype), trust_plugins=args.trust_plugin)
    check_output_folder(args.target, (args.source,), args.overwrite, option="--overwrite")
    export_hf(
        model,
        args.target,
        tokenizer=load_tokenizer(args.source),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        sources=(args.source,),
    )
    print(f"exported {model.config.name or 'model'} ({model.num_parameters():,} parameters) to {args.target}")
    return 0


def main_import() -> None:
    sys.exit(run(import_main))


def main_export() -> None:
    sys.exit(run(export_main))
