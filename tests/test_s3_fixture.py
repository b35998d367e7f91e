"""The S3-compatible test server works through pyarrow.fs as the pipeline uses it."""

from __future__ import annotations

import pyarrow.fs as pafs


def test_s3_bucket_roundtrip_through_pyarrow_uri(s3_bucket):
    fs, path = pafs.FileSystem.from_uri(f"{s3_bucket}/a/b.txt")
    with fs.open_output_stream(path) as f:
        f.write(b"hello")
    fs2, path2 = pafs.FileSystem.from_uri(f"{s3_bucket}/a/b.txt")
    with fs2.open_input_stream(path2) as f:
        assert f.read() == b"hello"
    listed = fs.get_file_info(pafs.FileSelector(f"{s3_bucket.removeprefix('s3://')}/a"))
    assert [i.base_name for i in listed] == ["b.txt"]
