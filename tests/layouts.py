"""Writers of the raw file layouts the recipes in ``pipelines/datasets/`` describe, for the data that cannot be
shipped or fetched here (Avazu, Ali-CCP) and for the Kaggle CSV form of Criteo. One writer per layout, seeded,
importable by the tests (``from layouts import write_avazu``: pytest puts ``tests/`` on the path) and by
scripts that put ``tests/`` on ``sys.path``.

* :func:`criteo_tsv_to_csv`: Criteo TSV rows (label, I1..I13, C1..C26) -> the Kaggle CSV variant, a header
  ``Id,Label,I1..I13,C1..C26`` and a running ``Id`` (from 10000000, as Kaggle's) before each row.
* :func:`write_avazu`: Avazu's ``train.csv`` (Kaggle, 2014): 24 columns ``id,click,hour,C1,banner_pos,...,C21``;
  ``id`` a 64-bit integer, ``hour`` YYMMDDHH over ten days from 14102100, the site/app/device columns 8-hex
  tokens, C1, banner_pos, device_type, device_conn_type and C14..C21 small integers.
* :func:`write_ali_ccp`: the preprocessed Ali-CCP CSV that torch-rechub ships
  (``examples/ranking/data/ali-ccp/ali_ccp_{train,val,test}_sample.csv``): a header ``click,purchase``, the 23
  sparse fields by their Ali-CCP field ids (``101 .. 150_14``, already integer ids, 0 the upstream's rare/unseen
  value) and 8 dense ``D*`` columns (min-max scaled to [0, 1]); purchase is 1 only on clicked rows (the
  upstream's preprocessing drops click 0 / purchase 1 rows).

The values are drawn Zipf-like from per-column pools, so vocabularies have a head and a long tail as in the
real files; what the tests check is computed from the written file, never from the generator's parameters.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CRITEO_CSV_HEADER = ["Id", "Label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]

AVAZU_HEADER = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
AVAZU_FIRST_HOUR = "14102100"  # 2014-10-21 00:00 UTC, a Tuesday; the real train.csv runs to 14103023

ALI_CCP_SPARSE = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216",
                  "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14"]
ALI_CCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
ALI_CCP_HEADER = ["click", "purchase", *ALI_CCP_SPARSE, *ALI_CCP_DENSE]


def criteo_tsv_to_csv(tsv_paths: list[Path], path: Path) -> int:
    """The rows of ``tsv_paths`` (in order) as one Kaggle-style Criteo CSV; returns the row count."""
    n = 0
    with path.open("w", newline="") as out:
        out.write(",".join(CRITEO_CSV_HEADER) + "\n")
        for p in tsv_paths:
            with p.open(newline="") as f:
                for line in f:
                    cells = line.rstrip("\n").rstrip("\r").split("\t")
                    if any("," in c or '"' in c for c in cells):
                        raise ValueError(f"{p}: a cell holds ',' or '\"'; this writer does not quote")
                    out.write(f"{10_000_000 + n}," + ",".join(cells) + "\n")
                    n += 1
    return n


def _zipf(rng: np.random.Generator, k: int, n: int, power: float = 3.0) -> np.ndarray:
    """``n`` indices into a pool of ``k`` values, low indices most common."""
    return np.minimum((k * rng.random(n) ** power).astype(np.int64), k - 1)


def _hex_pool(rng: np.random.Generator, k: int) -> np.ndarray:
    return np.array([f"{x:08x}" for x in rng.integers(0, 2**32, size=k, dtype=np.uint64)], dtype=object)


def write_avazu(path: Path, rows: int, seed: int = 0, days: int = 10) -> Path:
    """``rows`` rows of Avazu's ``train.csv`` layout, in time order as the real file (see the module docstring)."""
    rng = np.random.default_rng(seed)
    hours = np.sort(rng.integers(0, 24 * days, size=rows))  # hours since 2014-10-21 00:00
    day, hod = 21 + hours // 24, hours % 24
    cols: dict[str, np.ndarray] = {
        "id": np.array([str(x) for x in rng.integers(10**17, 2**63 - 1, size=rows, dtype=np.int64)], dtype=object),
        "click": (rng.random(rows) < 0.17).astype(np.int64),
        "hour": np.array([f"1410{d:02d}{h:02d}" for d, h in zip(day, hod)], dtype=object),
    }
    small = {"C1": [1005, 1002, 1010, 1012, 1007, 1001, 1008], "banner_pos": [0, 1, 7, 2, 4, 5, 3],
             "device_type": [1, 0, 4, 5, 2], "device_conn_type": [0, 2, 3, 5], "C15": [320, 300, 216, 728, 120, 1024,
             480, 768], "C16": [50, 250, 36, 480, 90, 20, 768, 1024], "C18": [0, 3, 2, 1]}
    pools = {"site_id": 400, "site_domain": 300, "site_category": 20, "app_id": 300, "app_domain": 60,
             "app_category": 25, "device_id": 2000, "device_ip": 4000, "device_model": 800}
    for name in AVAZU_HEADER[3:]:
        if name in small:
            cols[name] = np.array(small[name])[_zipf(rng, len(small[name]), rows, 2.0)]
        elif name in pools:
            cols[name] = _hex_pool(rng, pools[name])[_zipf(rng, pools[name], rows)]
        elif name == "C14":
            cols[name] = rng.integers(375, 24053, size=600)[_zipf(rng, 600, rows)]
        elif name == "C17":
            cols[name] = rng.integers(112, 2758, size=200)[_zipf(rng, 200, rows)]
        elif name == "C19":
            cols[name] = np.array([35, 39, 167, 161, 47, 1327, 33, 1063, 175, 687, 41, 43])[_zipf(rng, 12, rows)]
        elif name == "C20":
            pool = np.concatenate([[-1], rng.integers(100000, 100249, size=150)])
            cols[name] = pool[_zipf(rng, len(pool), rows)]
        elif name == "C21":
            cols[name] = rng.integers(1, 256, size=60)[_zipf(rng, 60, rows)]
        else:
            raise AssertionError(name)
    # the real device_id is "a99f214a" on most rows, and app_id "ecad2386" on site traffic
    cols["device_id"][rng.random(rows) < 0.8] = "a99f214a"
    cols["app_id"][rng.random(rows) < 0.6] = "ecad2386"
    _write_csv(path, AVAZU_HEADER, cols, rows)
    return path


def write_ali_ccp(path: Path, rows: int, seed: int = 0, ctr: float = 0.2, cvr: float = 0.1) -> Path:
    """``rows`` rows of torch-rechub's preprocessed Ali-CCP CSV (see the module docstring). ``ctr`` and ``cvr``
    (purchase rate among clicks) are higher than the real data's (~4% and ~0.5%) so a few thousand rows hold
    both classes of both tasks."""
    rng = np.random.default_rng(seed)
    click = (rng.random(rows) < ctr).astype(np.int64)
    cols: dict[str, np.ndarray] = {"click": click, "purchase": click * (rng.random(rows) < cvr)}
    sizes = {"101": 1500, "121": 3, "122": 3, "124": 2, "125": 6, "126": 3, "127": 3, "128": 2, "129": 4,
             "205": 3000, "206": 400, "207": 1200, "210": 900, "216": 600, "508": 300, "509": 200, "702": 250,
             "853": 400, "301": 3, "109_14": 50, "110_14": 800, "127_14": 700, "150_14": 300}
    for name in ALI_CCP_SPARSE:
        ids = _zipf(rng, sizes[name], rows)  # upstream ids: 0 (below its min count) and 1..k
        if sizes[name] <= 6:
            ids = np.where(rng.random(rows) < 0.9, 1, ids)  # the near-constant profile fields of the real sample
        cols[name] = ids
    for name in ALI_CCP_DENSE:
        pool = np.round(rng.random(120), 4)
        values = pool[_zipf(rng, len(pool), rows)]
        values[rng.random(rows) < 0.5] = 0.0  # many zeros, as in the real sample
        cols[name] = np.array([repr(float(v)) for v in values], dtype=object)
    _write_csv(path, ALI_CCP_HEADER, cols, rows)
    return path


def _write_csv(path: Path, header: list[str], cols: dict[str, np.ndarray], rows: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(zip(*(cols[h].tolist() for h in header)))


__all__ = ["ALI_CCP_DENSE", "ALI_CCP_HEADER", "ALI_CCP_SPARSE", "AVAZU_FIRST_HOUR", "AVAZU_HEADER",
           "CRITEO_CSV_HEADER", "criteo_tsv_to_csv", "write_ali_ccp", "write_avazu"]
