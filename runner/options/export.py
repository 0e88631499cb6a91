"""``runner export``'s dataset flags (imagefolder, webdataset, parquet --per-image): flags of
one command, not run options, so they are not in the option table."""

from __future__ import annotations

import argparse

from runner.errors import UsageError


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """``runner export``'s dataset flags (imagefolder, webdataset, parquet --per-image)."""
    a = p.add_argument
    a("--per-image", action="store_true",
      help="with --format parquet: one row per output image, the dataset's columns")  # fmt: skip
    a("--with-bytes", action="store_true",
      help="with --format parquet --per-image: an `image` column of the file's bytes")  # fmt: skip
    a("--include-failed", action="store_true", help="the images of failed jobs too")
    a("--include-flagged", action="store_true",
      help="images the safety checker flagged (has_nsfw_concepts) too")  # fmt: skip
    a("--split-column", metavar="COL",
      help="a manifest column naming each image's split: OUT/train/, OUT/test/, ...")  # fmt: skip
    a("--shard-size", metavar="SIZE",
      help="with --format webdataset: bytes per tar shard, like 500MB (default 1GB)")  # fmt: skip


DATASET_FORMATS = ("imagefolder", "webdataset")


def dataset_export(args: argparse.Namespace) -> bool:
    """Whether ``runner export`` was asked for a dataset; refuses flags of the other kind."""
    dataset = args.format in DATASET_FORMATS or (args.format == "parquet" and args.per_image)
    if args.per_image and args.format != "parquet":
        raise UsageError("--per-image is for --format parquet (imagefolder and webdataset "
                         "are one sample per image already)")  # fmt: skip
    if args.with_bytes and not (args.format == "parquet" and args.per_image):
        raise UsageError("--with-bytes is for --format parquet --per-image")
    if args.shard_size is not None and args.format != "webdataset":
        raise UsageError("--shard-size is for --format webdataset")
    if not dataset:
        for flag in ("include_failed", "include_flagged", "split_column"):
            if getattr(args, flag) not in (None, False):
                name = "--" + flag.replace("_", "-")
                raise UsageError(f"{name} is for the dataset exports: --format imagefolder, "
                                 "webdataset, or parquet --per-image")  # fmt: skip
    return dataset
