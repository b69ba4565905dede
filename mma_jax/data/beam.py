"""Builds a dataset of mma_jax.data with Apache Beam, on any runner:

    python -m mma_jax.data.beam NAME --manual_dir=DIR --data_dir=DIR [Beam pipeline flags ...]

e.g. `--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--setup_file=./pyproject.toml --requirements_file=requirements.txt`, or `--runner=FlinkRunner
--flink_master=HOST:8081`, `--runner=SparkRunner --spark_master_url=spark://HOST:7077`; without
flags it runs here on DirectRunner. DIRs may be any epath location (gs://...). The builder must be
a builder_utils.RowsBuilder; the output is array_record, record for record what the plain build
writes, and the skip counts are stored in its metadata as the plain build stores them.

tfds's own `tfds build --beam_pipeline_options=...` does the same but imports TensorFlow, which
this project does not install.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mma_jax.data.beam", allow_abbrev=False,
      description="Build a tfds dataset of mma_jax.data with Apache Beam; flags this parser does "
                  "not know are Beam pipeline options.")
  parser.add_argument("name", help="the tfds name, e.g. image_captions, llava_instruct, gqa")
  parser.add_argument("--manual_dir", default=None, help="the source files (manual_dir)")
  parser.add_argument("--data_dir", required=True, help="where the array_record dataset goes")
  args, beam_flags = parser.parse_known_args(argv)
  import mma_jax.data  # noqa: F401  registers the builders
  from mma_jax.data.builder_utils import RowsBuilder, prepare
  import tensorflow_datasets as tfds

  if not issubclass(tfds.builder_cls(args.name.split("/")[0]), RowsBuilder):
    parser.error(f"{args.name} is not a builder_utils.RowsBuilder: it cannot build with Beam")
  builder = prepare(args.name, args.data_dir, args.manual_dir,
                    beam_flags=beam_flags or ["--runner=DirectRunner"])
  for split, info in builder.info.splits.items():
    skipped = builder.info.metadata.get("skipped", {}).get(split, {})
    print(f"{args.name}/{split}: {info.num_examples} examples in {info.num_shards} shards; "
          f"skipped {sum(skipped.values())} {skipped}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
