"""``recsys-transfer download`` against a local HTTP server on 127.0.0.1 (nothing else is contacted).

The server serves, under the paths of the production URLs (reached through RECSYS_DOWNLOAD_MIRROR), an
``ml-100k.zip`` built here from the real MovieLens-100K files and a fake ``day_0.gz`` (the gzipped 8k Criteo
sample). Its handler answers Range requests and can drop the connection after K bytes, stall, ignore Range or
answer 404; it records what every request asked for.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from recsys_transfer.cli import main
from recsys_transfer.data import download as dl
from recsys_transfer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
U_DATA_MD5 = "6e47046882bad158b0efbb84cd5cb987"  # /work/shared/data/README.md
ML100K = ("u.data", "u.user", "u.item", "README")


@dataclass
class Behaviour:
    root: Path
    drops: int = 0  # this many responses stop after drop_after body bytes ...
    drop_after: int = 0
    stall_s: float = 0.0  # ... after sleeping this long
    ignore_range: bool = False
    not_found: bool = False
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header) of every GET


class RangeHandler(BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` (206, or 416 past the end); HTTP/1.0, so every response closes the connection."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        b: Behaviour = self.server.behaviour  # type: ignore[attr-defined]
        asked = self.headers.get("Range")
        b.seen.append((self.path, asked))
        path = b.root / self.path.lstrip("/")
        if b.not_found or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if asked and not b.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.drops:
            b.drops -= 1
            self.wfile.write(body[:b.drop_after])
            self.wfile.flush()
            time.sleep(b.stall_s)
            return
        self.wfile.write(body)


def _path(name: str) -> str:
    return urlsplit(dl.DATASETS[name].url).path.lstrip("/")


@pytest.fixture(scope="module")
def served(ml100k_dir: Path, criteo8k_dir: Path, tmp_path_factory) -> Path:
    """The server's root: ml-100k.zip (members under ml-100k/, as GroupLens's) and day_0.gz, at their URL paths."""
    root = tmp_path_factory.mktemp("served")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ML100K:
            zf.writestr(zipfile.ZipInfo(f"ml-100k/{name}", (1998, 4, 23, 0, 0, 0)), (ml100k_dir / name).read_bytes(),
                        zipfile.ZIP_DEFLATED)
    for name, data in (("movielens-100k", buf.getvalue()),
                       ("criteo-terabyte-day-0", gzip.compress((criteo8k_dir / "train.tsv").read_bytes(), mtime=0))):
        (root / _path(name)).parent.mkdir(parents=True, exist_ok=True)
        (root / _path(name)).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def server(served: Path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.behaviour = Behaviour(served)  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def srv(server, served: Path, monkeypatch) -> Behaviour:
    """A fresh behaviour per test, RECSYS_DOWNLOAD_MIRROR pointing at the server."""
    server.behaviour = Behaviour(served)
    monkeypatch.setenv(dl.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    return server.behaviour


def _zip(srv: Behaviour) -> bytes:
    return (srv.root / _path("movielens-100k")).read_bytes()


def _day0(srv: Behaviour) -> bytes:
    return (srv.root / _path("criteo-terabyte-day-0")).read_bytes()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m recsys_transfer download ...`` in a subprocess (the environment, mirror included, passes on)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recsys_transfer", "download", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_download_and_extract_movielens_100k(srv, ml100k_dir, tmp_path, capsys):
    assert main(["download", "movielens-100k", "--dir", str(tmp_path), "--md5", _md5(_zip(srv))]) == 0
    out = capsys.readouterr().out
    dest = tmp_path / "movielens-100k"
    assert hashlib.md5((dest / "u.data").read_bytes()).hexdigest() == U_DATA_MD5
    assert all((dest / f).read_bytes() == (ml100k_dir / f).read_bytes() for f in ML100K)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movielens-100k"]  # no .part, zip or temp dir left
    assert srv.seen == [("/datasets/movielens/ml-100k.zip", None)]
    assert "checking the given md5 instead of the recorded md5 0e33842e24a9c977be4e0107933c0723" in out
    assert "md5 ok" in out and f"extracted to {dest}" in out

    assert main(["download", "movielens-100k", "--dir", str(tmp_path)]) == 0  # present: no second request
    assert f"movielens-100k: already present: {dest}" in capsys.readouterr().out
    assert len(srv.seen) == 1


def test_an_interrupted_download_resumes_with_a_range_request(srv, tmp_path):
    srv.drops, srv.drop_after = 1, 100_000
    zip_md5 = _md5(_zip(srv))
    first = _cli("movielens-100k", "--dir", str(tmp_path), "--md5", zip_md5, "--retries", "0")
    line = _one_error_line(first)
    part = tmp_path / "ml-100k.zip.part"
    assert f"closed after 100,000 of {len(_zip(srv)):,} bytes" in line and "run the same command again" in line
    assert part.read_bytes() == _zip(srv)[:100_000]

    second = _cli("movielens-100k", "--dir", str(tmp_path), "--md5", zip_md5)
    assert second.returncode == 0, second.stderr
    assert srv.seen[1] == ("/datasets/movielens/ml-100k.zip", "bytes=100000-")  # what the server really got
    assert "re-hashing the 100,000 bytes of ml-100k.zip.part" in second.stdout
    assert "resuming at byte 100,000" in second.stdout
    assert (tmp_path / "movielens-100k" / "u.data").is_file() and not part.exists()


def test_a_dropped_connection_is_resumed_within_the_run_and_the_file_is_byte_identical(srv, tmp_path, capsys):
    srv.drops, srv.drop_after = 2, 30_000
    path = dl.download("criteo-terabyte-day-0", tmp_path, progress="lines", retry_wait_s=0)
    assert path == tmp_path / "criteo-terabyte" / "day_0.gz" and path.read_bytes() == _day0(srv)
    assert [r for _, r in srv.seen] == [None, "bytes=30000-", "bytes=60000-"]
    out = capsys.readouterr().out
    assert "(retry 1 of 3)" in out and "(retry 2 of 3)" in out
    assert "no checksum recorded for day_0.gz" in out and f"size {len(_day0(srv)):,} bytes" in out
    assert "(100%)" in out  # plain progress lines off a terminal

    assert main(["download", "criteo-terabyte-day-0", "--dir", str(tmp_path), "--md5", _md5(_day0(srv))]) == 0
    assert "already present" in capsys.readouterr().out and len(srv.seen) == 3  # checked, not fetched again


def test_a_server_that_ignores_range_restarts_the_file(srv, tmp_path, capsys):
    srv.ignore_range = True
    target = tmp_path / "criteo-terabyte"
    target.mkdir()
    (target / "day_0.gz.part").write_bytes(_day0(srv)[:5000])
    dl.download("criteo-terabyte-day-0", tmp_path, md5=_md5(_day0(srv)), progress="bar")  # tqdm on stderr
    assert (target / "day_0.gz").read_bytes() == _day0(srv)
    assert srv.seen == [("/criteo-cail-datasets/day_0.gz", "bytes=5000-")]
    out = capsys.readouterr().out
    assert out.count("ignored the resume request") == 1 and "md5 ok" in out


def test_a_complete_part_file_gets_416_and_is_kept(srv, tmp_path, capsys):
    target = tmp_path / "criteo-terabyte"
    target.mkdir()
    (target / "day_0.gz.part").write_bytes(_day0(srv))
    dl.download("criteo-terabyte-day-0", tmp_path, sha256=hashlib.sha256(_day0(srv)).hexdigest(), progress="none")
    assert (target / "day_0.gz").read_bytes() == _day0(srv)
    assert srv.seen == [("/criteo-cail-datasets/day_0.gz", f"bytes={len(_day0(srv))}-")]
    assert "already holds the whole file" in capsys.readouterr().out


def test_a_checksum_mismatch_is_one_line_and_deletes_the_part(srv, tmp_path):
    # our zip is not GroupLens's byte for byte: the recorded md5 (through the mirror) must refuse it
    got = _md5(_zip(srv))
    line = _one_error_line(_cli("movielens-100k", "--dir", str(tmp_path), "--no-progress"))
    assert line == (f"error: {tmp_path / 'ml-100k.zip'}: md5 mismatch: expected 0e33842e24a9c977be4e0107933c0723, "
                    f"got {got} (deleted ml-100k.zip.part; run again to download it anew)")
    assert list(tmp_path.iterdir()) == []


def test_http_404_is_one_line(srv, tmp_path):
    srv.not_found = True
    line = _one_error_line(_cli("criteo-terabyte-day-0", "--dir", str(tmp_path)))
    assert line.startswith(f"error: day_0.gz not found at {os.environ[dl.MIRROR_ENV]}/criteo-cail-datasets/day_0.gz "
                           "(HTTP 404)")


def test_a_stalled_server_times_out(srv, tmp_path):
    srv.drops, srv.drop_after, srv.stall_s = 1, 1000, 3.0
    with pytest.raises(UserError, match=r"broke after 1,000 bytes \(nothing received for 0.5 s\); kept 1,000 bytes"):
        dl.download("criteo-terabyte-day-0", tmp_path, progress="none", retries=0, timeout_s=0.5)


def test_server_down_is_one_line_without_traceback(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(dl.MIRROR_ENV, f"http://127.0.0.1:{port}")
    line = _one_error_line(_cli("movielens-100k", "--dir", str(tmp_path)))
    assert line == (f"error: cannot reach 127.0.0.1:{port} (offline?): [Errno 111] Connection refused; download "
                    f"http://127.0.0.1:{port}/datasets/movielens/ml-100k.zip by hand to {tmp_path / 'ml-100k.zip'} "
                    "and run again")


def test_list_and_mistakes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "movielens-100k          md5 0e33842e24a9c977be4e0107933c0723" in out
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in out
    assert "criteo-terabyte/day_23.gz" in out and out.count("none published") == 24
    for argv, msg in ((["nope", "--dir", str(tmp_path)], "error: unknown dataset 'nope'"),
                      (["movielens-100k"], "error: download needs NAME ... and --dir DIR"),
                      (["movielens-100k", "--dir", str(tmp_path), "--md5", "xyz"], "error: --md5 expects 32 hex"),
                      (["movielens-100k", "movielens-1m", "--dir", str(tmp_path), "--md5", "0" * 32],
                       "error: --md5/--sha256 check one file")):
        assert main(["download", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(msg) and err.count("\n") == 1, err
    monkeypatch.setenv(dl.MIRROR_ENV, "http://mirror.example.org/data/")
    assert dl.source_url(dl.DATASETS["criteo-terabyte-day-7"]) == \
        "http://mirror.example.org/data/criteo-cail-datasets/day_7.gz"


def test_the_recorded_table():
    assert dl.DATASETS["movielens-100k"].checksums == {"md5": "0e33842e24a9c977be4e0107933c0723"}
    assert dl.DATASETS["movielens-1m"].checksums == {"md5": "c4d9eecfca2ab87c1945afe126590906"}
    assert [n for n in dl.DATASETS if n.startswith("criteo")] == [f"criteo-terabyte-day-{n}" for n in range(24)]
    assert all(not s.checksums for n, s in dl.DATASETS.items() if n.startswith("criteo"))
    with pytest.raises(ValueError, match="md5 must be 32"):
        dl.Source("x", "https://h/x.gz", "x.gz", md5="ABC")


def test_missing_data_ends_the_run_with_one_line_on_how_to_get_it(tmp_path):
    """A run without the real data says once, at the end, how to get it (this file's own tests, minus this one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", dl.MIRROR_ENV)}
    env.update(RECSYS_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
                           "tests/test_download.py", "-k", "not missing_data_ends"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("real data missing:")]
    assert len(lines) == 1, proc.stdout[-3000:]
    n = len(re.findall(r"^tests/test_download.py::\S+ SKIPPED", proc.stdout, re.M)) or \
        int(re.search(r"(\d+) skipped", proc.stdout)[1])
    assert lines[0].startswith(f"real data missing: {n} tests skipped; get MovieLens-100K with `recsys-transfer "
                               "download movielens-100k --dir DIR` and set RECSYS_DATA_DIR=DIR")
