"""The tfds builders built with Apache Beam (DirectRunner) give the records, files and skip counts
of the plain build; the parts Beam workers read cover every row once."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures
import mma_jax.data  # noqa: F401  registers the builders
from mma_jax.data import beam as beam_cli
from mma_jax.data import image_captions, llava_instruct
from mma_jax.data.builder_utils import index_parts, line_parts, prepare, read_lines

CASES = {  # dataset: (fixture writer, id feature, kept ids, skip counts)
    "image_captions": (data_fixtures.write_captions, "image_file", data_fixtures.CAPTIONS_KEPT,
                       data_fixtures.CAPTIONS_SKIPPED),
    "llava_instruct": (data_fixtures.write_llava, "id", data_fixtures.LLAVA_KEPT,
                       data_fixtures.LLAVA_SKIPPED),
}


def as_python(value):
  """A record read back (numpy arrays, nested dicts) as comparable Python values."""
  if isinstance(value, dict):
    return {k: as_python(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def records(name, data_dir, id_key):
  source = tfds.data_source(name, split="train", data_dir=str(data_dir))
  rows = [source[i] for i in range(len(source))]
  return sorted(rows, key=lambda r: r[id_key])


@pytest.mark.parametrize("name", CASES)
def test_beam_build_equals_the_plain_build(name, tmp_path, monkeypatch):
  write, id_key, kept, skipped = CASES[name]
  write(tmp_path / "manual")
  # Small parts, so that rows of several parts (and part boundaries) meet in the pipeline.
  monkeypatch.setattr(image_captions, "LINES_PER_PART", 3)
  monkeypatch.setattr(llava_instruct, "ROWS_PER_PART", 4)
  prepare(name, tmp_path / "plain", tmp_path / "manual")
  if name == "image_captions":
    prepare(name, tmp_path / "beam", tmp_path / "manual", beam_flags=["--runner=DirectRunner"])
  else:   # the command line (DirectRunner when no Beam flag is given)
    beam_cli.main([name, f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'beam'}"])

  plain, beam = records(name, tmp_path / "plain", id_key), records(name, tmp_path / "beam", id_key)
  assert [r[id_key].decode() for r in plain] == sorted(kept)
  assert [as_python(r) for r in beam] == [as_python(r) for r in plain]
  # The same keys, so the same shards byte for byte (in one process: the serialized protobuf
  # maps' order varies between processes, the records do not).
  files = {d: sorted((tmp_path / d / name / "1.0.0").glob("*.array_record*"))
           for d in ("plain", "beam")}
  assert [f.name for f in files["plain"]] == [f.name for f in files["beam"]]
  assert [f.read_bytes() for f in files["plain"]] == [f.read_bytes() for f in files["beam"]]
  # Skip counts: Beam counters stored in the metadata as the plain build stores its tally.
  for data_dir in ("plain", "beam"):
    metadata = tfds.builder(name, data_dir=str(tmp_path / data_dir)).info.metadata
    assert metadata["kept"] == {"train": len(kept)}, data_dir
    assert metadata["skipped"] == {"train": skipped}, data_dir


@pytest.mark.parametrize("per_part", [None, 1, 2, 3, 7])
def test_line_parts_cover_every_line_once(tmp_path, per_part):
  path = tmp_path / "rows.jsonl"
  lines = ["a", "", "b b", "c", "", "", "d", "e"]
  path.write_text("\n".join(lines))            # (no newline after the last line)
  parts = line_parts(path, per_part)
  read = [row for part in parts for row in read_lines(path, part)]
  expected = [(f"line {n}", (n, (text + ("\n" if n < len(lines) else "")).encode()))
              for n, text in enumerate(lines, start=1) if text]
  assert read == expected
  assert len(parts) == (1 if per_part is None else -(-len(lines) // per_part))


def test_index_parts():
  assert index_parts(7, 3) == [(0, 3), (3, 6), (6, 7)]
  assert index_parts(0, 5) == []
