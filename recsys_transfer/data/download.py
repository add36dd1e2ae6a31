"""Fetch the public raw data the readers take: ``recsys-transfer download NAME --dir DIR``.

:data:`DATASETS` is the one table of what can be fetched: MovieLens-100K and -1M (GroupLens zips, extracted to
``DIR/movielens-100k/`` and ``DIR/movielens-1m/``, the layout ``prepare --dataset movielens`` reads) and the 24 day
files of Criteo's terabyte click logs (``DIR/criteo-terabyte/day_N.gz``, kept gzipped as published, ~15 GB each;
``prepare --dataset criteo`` reads them gzipped). A download streams to ``FILE.part``; an interrupted one resumes with an HTTP ``Range`` request (the
same command again, and up to ``retries`` times on its own when the connection drops), is checked against the
recorded md5 (or the ``md5``/``sha256`` a user passes), and only then gets its final name, so a file under its final
name is a complete, checked one and is never fetched again.

``RECSYS_DOWNLOAD_MIRROR`` (a base URL such as ``http://mirror.example.org/data``) replaces the scheme and host of
every URL, keeping its path: ``https://files.grouplens.org/datasets/movielens/ml-100k.zip`` is then fetched from
``http://mirror.example.org/data/datasets/movielens/ml-100k.zip``. The tests point it at a local server.

Every failure a user can meet (offline, connection refused, HTTP 404, a stalled server, a checksum mismatch, a full
disk) is a one-line :class:`~recsys_transfer.errors.UserError`. No torch here: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlsplit

from recsys_transfer.errors import UserError

MIRROR_ENV = "RECSYS_DOWNLOAD_MIRROR"
TIMEOUT_S = 60.0  # a socket that receives nothing for this long is an error, not a hang
CHUNK = 1 << 20
_HEX = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class Source:
    """One downloadable file and where it lands under ``--dir``.

    ``url`` is where its publisher serves it; ``md5``/``sha256`` its recorded checksum (``None``: none published);
    ``target`` the path under DIR: the directory a zip is extracted into (the files under ``archive_root`` inside
    the zip, which must include ``required``), or the file itself when ``archive_root`` is ``None``.
    """

    name: str
    url: str
    target: str
    md5: str | None = None
    sha256: str | None = None
    archive_root: str | None = None
    required: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        for algo in _HEX:
            value = getattr(self, algo)
            if value is not None and not re.fullmatch(f"[0-9a-f]{{{_HEX[algo]}}}", value):
                raise ValueError(f"{self.name}: {algo} must be {_HEX[algo]} lowercase hex digits, got {value!r}")
        if self.archive_root is not None and not self.required:
            raise ValueError(f"{self.name}: an archive needs the files it must yield (required)")

    @property
    def filename(self) -> str:
        return urlsplit(self.url).path.rsplit("/", 1)[-1]

    @property
    def checksums(self) -> dict[str, str]:
        return {algo: v for algo in _HEX if (v := getattr(self, algo)) is not None}


# The md5s are the ones GroupLens publishes beside each zip (ml-100k.zip.md5, ml-1m.zip.md5), as quoted by many
# public code bases that verify these archives (PaddlePaddle's paddle.dataset, RecBole-style downloaders, ...).
# This project's machines cannot reach files.grouplens.org, so they were not re-fetched from there: a changed
# archive shows up as a one-line md5 mismatch naming both values.
_MOVIELENS = "https://files.grouplens.org/datasets/movielens/"
# Criteo publishes no checksum for the terabyte day files: a download is checked only against the size the server
# sends (Content-Length); pass --md5/--sha256 to check a value you have.
_CRITEO = "https://storage.googleapis.com/criteo-cail-datasets/"

DATASETS: dict[str, Source] = {
    s.name: s for s in (
        Source("movielens-100k", _MOVIELENS + "ml-100k.zip", "movielens-100k", md5="0e33842e24a9c977be4e0107933c0723",
               archive_root="ml-100k/", required=("u.data", "u.user", "u.item", "README"),
               note="MovieLens-100K (GroupLens; research use, no redistribution)"),
        Source("movielens-1m", _MOVIELENS + "ml-1m.zip", "movielens-1m", md5="c4d9eecfca2ab87c1945afe126590906",
               archive_root="ml-1m/", required=("ratings.dat", "users.dat", "movies.dat", "README"),
               note="MovieLens-1M (GroupLens; research use, no redistribution)"),
        *(Source(f"criteo-terabyte-day-{n}", f"{_CRITEO}day_{n}.gz", f"criteo-terabyte/day_{n}.gz",
                 note="Criteo 1TB click logs, one day (~15 GB gzipped); no published checksum") for n in range(24)),
    )
}


def get(name: str) -> Source:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose from movielens-100k, movielens-1m, "
                        "criteo-terabyte-day-0 ... criteo-terabyte-day-23 (recsys-transfer download --list)")
    return DATASETS[name]


def source_url(src: Source) -> str:
    """``src.url``, or the same path under ``$RECSYS_DOWNLOAD_MIRROR`` when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return src.url
    if not urlsplit(mirror).netloc:
        raise UserError(f"{MIRROR_ENV}={mirror!r} is not a base URL (expected e.g. http://mirror.example.org/data)")
    return mirror.rstrip("/") + urlsplit(src.url).path


def table() -> str:
    """The registry as the lines ``recsys-transfer download --list`` prints."""
    rows = [("NAME", "CHECKSUM", "STORED AS (under --dir)", "URL")]
    for s in DATASETS.values():
        check = next((f"{a} {v}" for a, v in s.checksums.items()), "none published (size checked)")
        rows.append((s.name, check, s.target + ("/" if s.archive_root else ""), source_url(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    mirror = os.environ.get(MIRROR_ENV)
    return "\n".join(lines + ([f"(URLs under {MIRROR_ENV}={mirror})"] if mirror else []))


def present(src: Source, root: Path) -> bool:
    """Whether DIR already holds ``src``: every required file of an extracted archive, or the final file."""
    dest = root / src.target
    if src.archive_root is None:
        return dest.is_file()
    return all((dest / f).is_file() for f in src.required)


def download(name: str, root: str | Path, *, md5: str | None = None, sha256: str | None = None,
             progress: str = "auto", retries: int = 3, retry_wait_s: float = 1.0, timeout_s: float = TIMEOUT_S,
             say: Callable[[str], None] = print) -> Path:
    """Fetch dataset ``name`` into ``root`` and return where it landed (the directory or the file).

    ``md5``/``sha256`` replace the recorded checksum (for a file with none, or a mirror's copy); ``progress`` is
    ``auto`` (a tqdm bar when stderr is a terminal, else a line per 10%), ``bar``, ``lines`` or ``none``;
    a connection that drops or stalls is resumed up to ``retries`` times, ``retry_wait_s * attempt`` apart.
    """
    src = get(name)
    root = Path(root)
    dest = root / src.target
    expected = _expected(src, md5, sha256, say)
    if present(src, root):
        what = f" ({', '.join(src.required)})" if src.archive_root else ""
        if src.archive_root is None and (md5 or sha256):
            _check(dest, expected, _hash_file(dest, expected))
            what = f" ({', '.join(expected)} ok)"
        say(f"{name}: already present: {dest}{what}")
        return dest
    if src.archive_root is not None and dest.exists() and any(dest.iterdir()):
        missing = next(f for f in src.required if not (dest / f).is_file())
        raise UserError(f"{dest} exists without {missing}: move it away (or complete it) and run again")
    file = root / src.filename if src.archive_root is not None else dest
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {file.parent}: {exc.strerror or exc}") from None
    if file.is_file():  # a finished download not yet extracted, or a file the user put there by hand
        _check(file, expected, _hash_file(file, expected))
        say(f"{name}: using {file} already there" + (f" ({', '.join(expected)} ok)" if expected else ""))
    else:
        url = source_url(src)
        say(f"{name}: {url} -> {file}")
        fetch = _Fetch(url, file, expected, progress, timeout_s, say)
        fetch.run(retries, retry_wait_s)
        os.replace(fetch.part, file)
        if expected:
            say(f"{name}: {', '.join(expected)} ok")
        elif fetch.total is not None:
            say(f"{name}: no checksum recorded for {src.filename} (its publisher gives none); size {fetch.total:,} "
                "bytes as the server announced; pass --sha256/--md5 to check one you have")
        else:
            say(f"{name}: no checksum recorded for {src.filename} and the server sent no size: the file is unchecked")
    if src.archive_root is None:
        return file
    _extract(src, file, dest)
    file.unlink()
    say(f"{name}: extracted to {dest} ({', '.join(src.required)})")
    return dest


def _expected(src: Source, md5: str | None, sha256: str | None, say: Callable[[str], None]) -> dict[str, str]:
    given = {a: v.strip().lower() for a, v in (("md5", md5), ("sha256", sha256)) if v}
    for algo, value in given.items():
        if not re.fullmatch(f"[0-9a-f]{{{_HEX[algo]}}}", value):
            raise UserError(f"--{algo} expects {_HEX[algo]} hex digits, got {value!r}")
    if not given:
        return src.checksums
    if src.checksums and src.checksums != given:
        say(f"{src.name}: checking the given {', '.join(given)} instead of the recorded "
            + ", ".join(f"{a} {v}" for a, v in src.checksums.items()))
    return given


def _hash_file(path: Path, expected: dict[str, str]) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in expected}
    if hashers:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                for h in hashers.values():
                    h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def _check(path: Path, expected: dict[str, str], got: dict[str, str], *, delete: Path | None = None) -> None:
    """Raise on the first checksum of ``path`` that differs; ``delete`` (the partial download) goes first."""
    for algo, want in expected.items():
        if got[algo] != want:
            if delete is not None:
                delete.unlink(missing_ok=True)
                fix = f"deleted {delete.name}; run again to download it anew"
            else:
                fix = "delete it and run again"
            raise UserError(f"{path}: {algo} mismatch: expected {want}, got {got[algo]} ({fix})")


class _Dropped(Exception):
    """The connection broke or stalled after the server answered: the bytes so far are kept, a retry resumes."""


class _Fetch:
    """Streams ``url`` to ``FILE.part``, resuming what is there, hashing as it writes."""

    def __init__(self, url: str, file: Path, expected: dict[str, str], progress: str, timeout_s: float,
                 say: Callable[[str], None]) -> None:
        self.url, self.file, self.expected, self.progress, self.timeout_s, self.say = (
            url, file, expected, progress, timeout_s, say)
        self.part = file.with_name(file.name + ".part")
        self.host = urlsplit(url).netloc
        self.total: int | None = None
        self.hashers = {a: hashlib.new(a) for a in expected}
        if self.part.is_file() and self.part.stat().st_size:
            size = self.part.stat().st_size
            if self.hashers:
                say(f"{file.name}: re-hashing the {size:,} bytes of {self.part.name} before resuming")
                with open(self.part, "rb") as f:
                    while block := f.read(CHUNK):
                        self._hash(block)

    def run(self, retries: int, retry_wait_s: float) -> None:
        for attempt in range(retries + 1):
            try:
                self._attempt()
                break
            except _Dropped as exc:
                kept = self.part.stat().st_size if self.part.exists() else 0
                if attempt == retries:
                    raise UserError(f"{exc}; kept {kept:,} bytes in {self.part}: run the same command again to "
                                    "resume") from None
                self.say(f"{self.file.name}: {exc}; resuming at byte {kept:,} (retry {attempt + 1} of {retries})")
                time.sleep(retry_wait_s * (attempt + 1))
        got = {a: h.hexdigest() for a, h in self.hashers.items()}
        _check(self.file, self.expected, got, delete=self.part)

    def _hash(self, block: bytes) -> None:
        for h in self.hashers.values():
            h.update(block)

    def _restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hashers = {a: hashlib.new(a) for a in self.expected}

    def _open(self, offset: int):
        headers = {"User-Agent": "recsys-transfer"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        by_hand = f"download {self.url} by hand to {self.file} and run again"
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                return exc  # the range starts at or past the end: the part may already be the whole file
            if exc.code == 404:
                where = f" ({MIRROR_ENV}={os.environ[MIRROR_ENV]})" if os.environ.get(MIRROR_ENV) else ""
                raise UserError(f"{self.file.name} not found at {self.url} (HTTP 404){where}") from None
            raise UserError(f"{self.url}: HTTP {exc.code} {exc.reason}; {by_hand}") from None
        except urllib.error.URLError as exc:  # DNS failure, refused connection, no route, connect timeout
            reason = exc.reason if isinstance(exc.reason, str) else str(exc.reason) or type(exc.reason).__name__
            raise UserError(f"cannot reach {self.host} (offline?): {reason}; {by_hand}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Dropped(f"{self.host} did not answer ({_describe(exc, self.timeout_s)})") from None

    def _attempt(self) -> None:
        offset = self.part.stat().st_size if self.part.is_file() else 0
        resp = self._open(offset)
        if resp.status == 416:
            total = _content_range(resp.headers.get("Content-Range", ""))[1]
            if total in (None, offset):
                self.say(f"{self.file.name}: {self.part.name} already holds the whole file ({offset:,} bytes)")
                self.total = offset
                return
            self.say(f"{self.file.name}: {self.part.name} is larger than the file on the server: starting over")
            self._restart()
            return self._attempt()
        with resp:
            if resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range", ""))
                if start != offset:
                    raise UserError(f"{self.url}: asked for bytes from {offset:,}, the server sent them from "
                                    f"{start}; delete {self.part} and run again")
                self.say(f"{self.file.name}: resuming at byte {offset:,}")
            else:
                if offset:
                    self.say(f"{self.file.name}: the server ignored the resume request (Range): downloading it again "
                             "from the start")
                    self._restart()
                    offset = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            self.total = total
            if total is not None:
                free = shutil.disk_usage(self.part.parent).free
                if total - offset > free:
                    raise UserError(f"{self.file.name} needs {total - offset:,} more bytes, {self.part.parent} has "
                                    f"{free:,} free")
            self._stream(resp, offset, total)

    def _stream(self, resp, offset: int, total: int | None) -> None:
        done = offset
        read = getattr(resp, "read1", resp.read)  # read1: what has arrived, so a stall loses no received bytes
        with open(self.part, "ab") as f, _Progress(self.progress, self.file.name, total, offset, self.say) as bar:
            while True:
                try:
                    block = read(CHUNK)
                except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                    raise _Dropped(f"connection to {self.host} broke after {done:,} bytes "
                                   f"({_describe(exc, self.timeout_s)})") from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as exc:
                    raise UserError(f"cannot write {self.part}: {exc.strerror or exc}") from None
                self._hash(block)
                done += len(block)
                bar.update(len(block))
        if total is not None and done < total:
            raise _Dropped(f"connection to {self.host} closed after {done:,} of {total:,} bytes")
        if total is not None and done > total:
            self._restart()
            raise UserError(f"{self.url}: received {done:,} bytes, the server announced {total:,}; deleted "
                            f"{self.part}, run again")


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"nothing received for {timeout_s:g} s"
    return str(exc) or type(exc).__name__


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (START, TOTAL); ``None`` for what is missing."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


class _Progress:
    """A tqdm bar on stderr (``bar``), a line per 10% on stdout (``lines``), or nothing; ``auto`` picks the bar on
    a terminal and lines otherwise."""

    def __init__(self, mode: str, label: str, total: int | None, initial: int, say: Callable[[str], None]) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, got {mode!r}")
        self.mode, self.label, self.total, self.done, self.say = mode, label, total, initial, say
        self.step = total // 10 if total else 256 << 20  # a line per 10%, or per 256 MiB of an unknown size
        self.next = (initial // self.step + 1) * self.step if self.step else None
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                            leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and self.next is not None and self.done >= self.next:
            of = f" of {self.total / 2**20:,.1f} MiB ({100 * self.done // self.total}%)" if self.total else ""
            self.say(f"{self.label}: {self.done / 2**20:,.1f} MiB{of}")
            self.next = (self.done // self.step + 1) * self.step

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _extract(src: Source, archive: Path, dest: Path) -> None:
    """The files under ``src.archive_root`` in ``archive`` -> ``dest``, through a temporary directory beside it."""
    root = src.archive_root or ""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(root):
                    continue
                rel = PurePosixPath(info.filename[len(root):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise UserError(f"{archive}: refusing the member {info.filename!r} (it points outside {dest})")
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as r, open(out, "wb") as w:
                    shutil.copyfileobj(r, w, CHUNK)
        missing = [f for f in src.required if not (tmp / f).is_file()]
        if missing:
            raise UserError(f"{archive}: holds no {root}{missing[0]}; delete it and run again")
        if dest.is_dir():
            dest.rmdir()  # empty: download() refused a non-empty one before fetching
        os.replace(tmp, dest)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{archive}: not a readable zip ({exc}); delete it and run again") from None
    except OSError as exc:
        raise UserError(f"cannot extract {archive} to {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
