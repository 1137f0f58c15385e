"""``python -m iat.export_sharded CHECKPOINT.dcp OUT.pt|OUT.safetensors``: a sharded training
checkpoint (--fsdp, ``iat.runs.sharded``) as this project's single-file weights, for --eval,
--predict and conversion.

The architecture comes from the checkpoint's state file; the model's shards are read (by one
process, whatever number saved them) through DCP's safetensors reader, nothing unpickled, and
written by ``nets.save_weights`` with the architecture recorded. A checkpoint that cannot be
read, or an output that cannot be written, is one error line and status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nets
from iat.convert.checkpoint import output_path, run_converter
from iat.runs.sharded import read_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iat.export_sharded",
        description="Write a sharded (--fsdp) checkpoint's weights as one .pt or .safetensors.",
    )
    parser.add_argument("checkpoint", help="a sharded checkpoint folder, checkpoint-epochNNNN.dcp")
    parser.add_argument("out", help="output weights: .pt or .safetensors, architecture recorded")
    return parser


def export(args: argparse.Namespace) -> str:
    """Writes ``args.checkpoint``'s weights to ``args.out``; returns the line to print."""
    out = output_path(args.out)
    model, record, epoch = read_model(Path(args.checkpoint))
    nets.save_weights(model, out, record)
    return (
        f"wrote {out}: {nets.describe_architecture(record)} after epoch {epoch}, from the "
        f"shards of {args.checkpoint}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_converter(build_parser(), export, argv)


if __name__ == "__main__":
    sys.exit(main())
