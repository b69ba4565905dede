"""Caption shards (webdataset layout) as a grain source: records in order, broken members as skip
records, the per-process split, exact resume, epochs."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mma_jax.data.webdataset import (CaptionShards, SampleError, expand_shards, read_shard,
                                     sample_record, split_key)


def image_bytes(format_: str, seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format=format_)
  return out.getvalue()


JPG, PNG = image_bytes("JPEG", 0), image_bytes("PNG", 1)
BROKEN = b"these bytes are not an image"


def write_tar(path, members) -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  path.write_bytes(out.getvalue())
  return out.getvalue()


# (shard, members); shard 2 is cut inside the image of its third sample.
SHARDS = {
    "cap-00000.tar": [
        ("s0.jpg", JPG), ("s0.txt", b"  A red square.\n"),
        ("s1.png", PNG), ("s1.json", json.dumps({"caption": "Blue dots.", "url": "x"}).encode()),
        ("s2.jpg", BROKEN), ("s2.txt", b"Not really an image."),   # a record: decoded later
        ("s3.jpg", JPG),                                            # no caption
        ("s4.jpg", JPG), ("s4.json", b"{not json"),
        ("s5.png", PNG), ("s5.json", b'{"url": "no caption here"}'),
    ],
    "cap-00001.tar": [
        ("dir/t0.png", PNG), ("dir/t0.txt", b"Nested key."),
        ("t1.txt", b"A caption without its image."),
        ("t2.JPG", JPG), ("t2.txt", "Ünïcode caption.".encode()),
    ],
    "cap-00002.tar": [
        ("u0.jpg", JPG), ("u0.txt", b"First of the cut shard."),
        ("u1.png", PNG), ("u1.txt", b"Second of the cut shard."),
        ("u2.jpg", JPG), ("u2.txt", b"Never read whole."),
    ],
}

EXPECTED = [  # (image_file or skip id, caption or skip reason, image bytes)
    ("cap-00000.tar:s0", "A red square.", JPG),
    ("cap-00000.tar:s1", "Blue dots.", PNG),
    ("cap-00000.tar:s2", "Not really an image.", BROKEN),
    ("cap-00000.tar:s3", "skip:missing_caption", None),
    ("cap-00000.tar:s4", "skip:malformed_caption_json", None),
    ("cap-00000.tar:s5", "skip:missing_caption", None),
    ("cap-00001.tar:dir/t0", "Nested key.", PNG),
    ("cap-00001.tar:t1", "skip:missing_image", None),
    ("cap-00001.tar:t2", "Ünïcode caption.", JPG),
    ("cap-00002.tar:u0", "First of the cut shard.", JPG),
    ("cap-00002.tar:u1", "Second of the cut shard.", PNG),
    ("cap-00002.tar:u2", "skip:truncated_shard", None),
]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  for name, members in SHARDS.items():
    data = write_tar(root / name, members)
    if name == "cap-00002.tar":
      # Cut 100 bytes into u2.jpg's data (its header is the fifth member's).
      with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        u2 = tar.getmember("u2.jpg")
      (root / name).write_bytes(data[:u2.offset_data + 100])
  return root


def summary(record):
  if "skip" in record:
    assert set(record) == {"skip", "id", "message"} and record["message"]
    return record["id"], "skip:" + record["skip"], None
  assert set(record) == {"image", "image_file", "caption"}
  return record["image_file"], record["caption"], record["image"]


def test_records_in_order_with_broken_members_as_skips(shard_dir):
  records = [summary(r) for r in CaptionShards(str(shard_dir))]
  assert records == EXPECTED


def test_each_process_reads_its_shards(shard_dir):
  pattern = str(shard_dir / "cap-*.tar")
  assert expand_shards(pattern) == expand_shards(str(shard_dir / "cap-{00000..00002}.tar"))
  first = [summary(r) for r in CaptionShards(pattern, process_index=0, process_count=2)]
  second = [summary(r) for r in CaptionShards(pattern, process_index=1, process_count=2)]
  # shard i goes to process i % 2
  assert first == [e for e in EXPECTED if not e[0].startswith("cap-00001")]
  assert second == [e for e in EXPECTED if e[0].startswith("cap-00001")]
  with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
    CaptionShards(pattern, process_index=3, process_count=4)


def test_resume_from_any_state_is_exact(shard_dir):
  dataset = CaptionShards(str(shard_dir), num_epochs=2, shuffle_shards=True, seed=3)
  assert dataset.order(0) != dataset.order(1)   # (for this seed) a new order per epoch
  iterator = iter(dataset)
  states, run = [], []
  for record in iterator:
    run.append(summary(record))
    states.append(iterator.get_state())
  assert len(run) == 2 * len(EXPECTED)
  assert sorted(run[:len(EXPECTED)], key=str) == sorted(EXPECTED, key=str)
  for k in (0, 1, 2, 3, 7, 8, 10, 11, 12, 17, 23):   # mid-shard, shard ends, across the epoch
    resumed = iter(dataset)
    resumed.set_state(states[k])
    assert [summary(r) for r in resumed] == run[k + 1:], f"resumed after record {k}"
  assert states[0]["offset"] > 0 and states[0]["epoch"] == 0


def test_epochs_repeat_forever(shard_dir):
  iterator = iter(CaptionShards(str(shard_dir / "cap-00001.tar"), num_epochs=None))
  records = [summary(next(iterator)) for _ in range(3 * 3 + 1)]
  assert records[:3] == records[3:6] == records[6:9] and records[9] == records[0]
  assert iterator.get_state() == {"epoch": 3, "shard": 0, "offset": iterator.get_state()["offset"]}


def test_bad_shards_are_skip_records(tmp_path):
  data = write_tar(tmp_path / "whole.tar", [("a.jpg", JPG), ("a.txt", b"A."),
                                            ("b.jpg", JPG), ("b.txt", b"B.")])
  (tmp_path / "cut_in_header.tar").write_bytes(data[:2 * 512 + 512 + 100])   # in a.txt's header
  (tmp_path / "not_a_tar.tar").write_bytes(b"plain text, not a tar archive" * 40)
  cut = [r for r, _ in read_shard(str(tmp_path / "cut_in_header.tar"))]
  assert [(r["skip"], r["id"]) for r in cut] == [("truncated_shard", "cut_in_header.tar:a")]
  assert "inside a header" in cut[0]["message"]
  shards = [str(tmp_path / n) for n in ("missing.tar", "not_a_tar.tar", "whole.tar")]
  records = list(CaptionShards(shards))
  assert [r.get("skip") or r["caption"] for r in records] == [
      "unreadable_shard", "unreadable_shard", "A.", "B."]
  assert "missing.tar" in records[0]["message"]


def test_split_key():
  assert split_key("a/b/000123.seg.jpg") == ("a/b/000123", "seg.jpg")
  assert split_key("k.JPEG") == ("k", "jpeg")


def test_caption_sources():
  json_caption = {"jpg": JPG, "json": json.dumps({"text": " From a key. "}).encode()}
  assert sample_record("s.tar", "k", json_caption, "text")["caption"] == "From a key."
  ocr = {"jpg": JPG, "txt": json.dumps([{"box": 1}, {"text": " OCR words "}]).encode()}
  record = sample_record("s.tar", "k", ocr, "caption", "blip3_ocr_200m")
  assert record == {"image": JPG, "image_file": "s.tar:k", "caption": "OCR words"}
  with pytest.raises(SampleError) as error:
    sample_record("s.tar", "k", {"jpg": JPG, "txt": b"plain words"}, "caption", "blip3_ocr_200m")
  assert error.value.reason == "malformed_caption"
  with pytest.raises(SampleError) as error:
    sample_record("s.tar", "k", {"jpg": JPG, "txt": b"\xff\xfe bad"}, "caption")
  assert error.value.reason == "malformed_caption"
