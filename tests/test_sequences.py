"""PeterRec's sequence data (recsys_transfer/data/sequences.py) on the real ML-100K and ML-1M-partial files.

The expected numbers are computed here independently, with plain Python over the raw files (csv-free string
splitting, dicts and sorted()), and the headline counts are also written out literally (measured 2026-12-03)."""

from __future__ import annotations

import doctest
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys_transfer.cli import main
from recsys_transfer.config import PrepareConfig, RunConfig, SequenceConfig, build, load_config
from recsys_transfer.data import sequences
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepare import prepare
from recsys_transfer.data.sequences import SequenceSampling
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
               "Western")
TARGET = {"Documentary", "Horror"}
AGES = (1, 18, 25, 35, 45, 50, 56)
# measured on the real files: (ratings, users, items, target items, cold users, cold rows, pretrain users,
# profile users = users with a source-domain rating)
HEADLINE = {"ml-100k": (100_000, 943, 1682, 142, 400, 730, 943, 943),
            "ml-1m-partial": (299_418, 5755, 3527, 421, 2325, 4003, 5701, 5709)}


# -- the raw files, read independently ---------------------------------------------------------------------------

def raw(directory: Path) -> dict:
    """ratings [(user, item, ts)], genres {item: set}, users {user: (gender, age bracket 0..6, occupation id)}."""
    if (directory / "u.data").exists():
        ratings = [tuple(int(x) for x in (f[0], f[1], f[3])) for f in
                   (line.split("\t") for line in (directory / "u.data").read_text().splitlines())]
        genres = {}
        for line in (directory / "u.item").read_text(encoding="latin-1").splitlines():
            f = line.split("|")
            genres[int(f[0])] = {g for g, flag in zip(GENRES_100K, f[5:]) if flag == "1"}
        occupations = sorted({line.split("|")[3] for line in (directory / "u.user").read_text().splitlines()})
        users = {}
        for line in (directory / "u.user").read_text().splitlines():
            u, age, gender, occ, _ = line.split("|")
            bracket = sum(int(age) >= a for a in AGES[1:])
            users[int(u)] = ("FM".index(gender), bracket, occupations.index(occ))
    else:
        ratings = []
        for name in ("ratings_part1.tsv", "ratings_part2.tsv"):
            lines = (directory / name).read_text().splitlines()
            assert lines[0].split("\t") == ["user_id", "movie_id", "rating", "timestamp"]
            ratings += [(int(f[0]), int(f[1]), int(f[3])) for f in (line.split("\t") for line in lines[1:])]
        genres = {int(f[0]): set(f[2].split("|")) for f in
                  (line.split("::") for line in (directory / "movies.dat").read_text(encoding="latin-1").splitlines())}
        users = {}
        for line in (directory / "users.dat").read_text(encoding="latin-1").splitlines():
            u, gender, age, occ, _ = line.split("::")
            users[int(u)] = ("FM".index(gender), AGES.index(int(age)), int(occ))
    item_count = Counter(i for _, i, _ in ratings)
    ids = {item: 2 + k for k, (item, _) in enumerate(sorted(item_count.items(), key=lambda kv: (-kv[1], kv[0])))}
    by_user = defaultdict(list)
    for u, i, ts in ratings:
        by_user[u].append((ts, i))
    for u in by_user:
        by_user[u].sort()
    return {"ratings": ratings, "genres": genres, "users": users, "ids": ids, "by_user": by_user}


def read_split(out: Path, split: str) -> dict:
    return pq.read_table(out / split / "part-00000.parquet").to_pydict()


@pytest.fixture(scope="module", params=["ml-100k", "ml-1m-partial"])
def source(request, ml100k_dir, ml1m_partial_dir, tmp_path_factory):
    """(name, raw dir, raw data, {task: (prepared dir, meta)}) for each real dataset, every task prepared once."""
    d = ml100k_dir if request.param == "ml-100k" else ml1m_partial_dir
    root = tmp_path_factory.mktemp(request.param)
    prepared = {t: (root / t, prepare(PrepareConfig(dataset="movielens-sequences", input=(str(d),),
                                                    sequence_task=t), root / t, progress=False))
                for t in ("pretrain", "profile", "cold")}
    return request.param, d, raw(d), prepared


# -- prepared data -----------------------------------------------------------------------------------------------

def test_item_vocabulary_and_reserved_ids(source):
    name, _, data, prepared = source
    n_ratings, n_users, n_items = HEADLINE[name][:3]
    assert (len(data["ratings"]), len(data["by_user"]), len(data["ids"])) == (n_ratings, n_users, n_items)
    for task, (out, meta) in prepared.items():
        assert meta.field("items").vocab_size == 2 + n_items
        for f in ("negatives", "targets"):
            assert meta.field(f).multi_valued and meta.field(f).vocab_of == "items"
        assert meta.source["reserved_ids"] == {"pad": 0, "token": 1, "first_item": 2}
        vocab = pq.read_table(out / "vocab" / "items.parquet").to_pydict()
        assert dict(zip(vocab["item"], vocab["id"])) == data["ids"]  # the same table for every task
        for split in ("train", "valid", "test"):
            rows = read_split(out, split)
            flat = [i for seq in rows["items"] for i in seq]
            assert flat and min(flat) >= 2 and max(flat) < 2 + n_items  # 0 and 1 never stored
            assert all(len(seq) <= 50 for seq in rows["items"]) and all(rows["items"])
            assert all(not x for x in rows["negatives"]) and all(not x for x in rows["targets"])


def _last(seq: list, n: int = 50) -> list:
    return seq[-n:]


def test_pretrain_rows_are_the_users_source_items_in_time_order(source):
    name, _, data, prepared = source
    out, meta = prepared["pretrain"]
    ids = data["ids"]
    src = {u: [ids[i] for _, i in seq if not data["genres"][i] & TARGET] for u, seq in data["by_user"].items()}
    keep = sorted(u for u, s in src.items() if len(s) >= 2)
    assert len(keep) == HEADLINE[name][6]
    n = len(keep)
    assert meta.split_rows == {"train": round(0.9 * n), "valid": round(0.09 * n),
                               "test": n - round(0.9 * n) - round(0.09 * n)}
    assert meta.skipped_rows == len(data["by_user"]) - n
    seen = []
    for split in ("train", "valid", "test"):
        rows = read_split(out, split)
        seen += rows["user"]
        for u, seq, nxt in zip(rows["user"], rows["items"], rows["next_item"]):
            full = src[u]
            assert nxt == full[-1]
            assert seq == (_last(full) if split == "train" else _last(full[:-1]))  # valid/test hold the last out
    assert sorted(seen) == keep
    assert meta.tasks[0].name == "next" and meta.tasks[0].kind == "retrieval"


def test_profile_labels_and_class_counts(source):
    name, _, data, prepared = source
    out, meta = prepared["profile"]
    ids = data["ids"]
    src = {u: [ids[i] for _, i in seq if not data["genres"][i] & TARGET] for u, seq in data["by_user"].items()}
    users = sorted(u for u, s in src.items() if s)  # the users with a source-domain rating
    assert meta.total_rows == len(users) == HEADLINE[name][7]
    assert meta.skipped_rows == len(data["by_user"]) - len(users)
    n = len(users)
    assert meta.split_rows["train"] == round(0.7 * n) and meta.split_rows["valid"] == round(0.03 * n)
    expected = {lab: Counter(data["users"][u][k] for u in users) for k, lab in enumerate(("gender", "age",
                                                                                          "occupation"))}
    got = {lab: Counter() for lab in expected}
    for split in ("train", "valid", "test"):
        rows = read_split(out, split)
        for k, u in enumerate(rows["user"]):
            assert rows["items"][k] == _last(src[u])  # the pretraining sequence: source-domain items
            for j, lab in enumerate(("gender", "age", "occupation")):
                assert rows[lab][k] == data["users"][u][j]
                got[lab][int(rows[lab][k])] += 1
    assert got == expected
    recorded = {lab: Counter() for lab in expected}
    for lab, per_split in meta.source["class_counts"].items():
        for counts in per_split.values():
            recorded[lab].update({int(k): v for k, v in counts.items()})
    assert recorded == expected
    assert [t.num_classes for t in meta.tasks] == [2, 7, 21]
    if name == "ml-1m-partial":  # literal checks of the measured classes
        assert expected["gender"] == {0: 1598, 1: 4111}
        assert expected["age"] == {0: 207, 1: 1020, 2: 2003, 3: 1133, 4: 520, 5: 472, 6: 354}
        assert len(expected["occupation"]) == 21 and len(expected["age"]) == 7
    else:
        assert expected["gender"] == {0: 273, 1: 670}
        assert expected["age"] == {0: 36, 1: 198, 2: 310, 3: 194, 4: 80, 5: 73, 6: 52}


def test_cold_rows_targets_and_eval_negatives(source):
    name, _, data, prepared = source
    out, meta = prepared["cold"]
    ids = data["ids"]
    target_ratings = [i for _, i, _ in data["ratings"] if data["genres"][i] & TARGET]
    tcount = Counter(target_ratings)
    classes = {item: k for k, (item, _) in enumerate(sorted(tcount.items(), key=lambda kv: (-kv[1], kv[0])))}
    cold = {}
    for u, seq in data["by_user"].items():
        tgt = [i for _, i in seq if data["genres"][i] & TARGET]
        src = [ids[i] for _, i in seq if not data["genres"][i] & TARGET]
        if 1 <= len(tgt) <= 3 and src:
            cold[u] = ({classes[i] for i in tgt}, _last(src))
    _, _, _, n_classes, n_cold, n_rows, _, _ = HEADLINE[name]
    assert (len(classes), len(cold), sum(len(t) for t, _ in cold.values())) == (n_classes, n_cold, n_rows)
    assert meta.source["num_target_classes"] == n_classes and meta.source["cold_users"] == n_cold
    assert meta.total_rows == n_rows and meta.field("eval_negatives").vocab_size == n_classes
    assert meta.split_rows["train"] == round(0.7 * n_rows) and meta.split_rows["valid"] == round(0.03 * n_rows)
    pairs = set()
    for split in ("train", "valid", "test"):
        rows = read_split(out, split)
        for u, raw_item, y, seq, neg in zip(rows["user"], rows["target_raw"], rows["target_item"], rows["items"],
                                            rows["eval_negatives"]):
            mine, src = cold[u]
            assert y == classes[raw_item] and y in mine and seq == src
            assert len(neg) == 99 == len(set(neg)) and not set(neg) & mine
            assert 0 <= min(neg) and max(neg) < n_classes and neg == sorted(neg)
            pairs.add((u, raw_item))
    assert len(pairs) == n_rows


def test_prepare_is_deterministic_and_seeded(ml100k_dir, tmp_path):
    def build_it(out, seed):
        return prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml100k_dir),), sequence_task="cold",
                                     seed=seed), out, progress=False)

    a, b, c = build_it(tmp_path / "a", 1), build_it(tmp_path / "b", 1), build_it(tmp_path / "c", 2)
    assert a.dataset_id == b.dataset_id != c.dataset_id
    assert read_split(tmp_path / "a", "test") == read_split(tmp_path / "b", "test")
    assert read_split(tmp_path / "a", "test") != read_split(tmp_path / "c", "test")
    meta = prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml100k_dir),), sequence_task="profile",
                                 split_fractions=(0.5, 0.25, 0.25)), tmp_path / "d", progress=False)
    assert meta.split_rows == {"train": 472, "valid": 236, "test": 235}  # round(0.5 * 943), round(0.25 * 943)


def test_options_are_validated_and_bad_input_is_one_line(ml100k_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="sequence_task must be one of"):
        PrepareConfig(dataset="movielens-sequences")
    with pytest.raises(ValueError, match="movielens-sequences options"):
        PrepareConfig(dataset="movielens", sequence_task="cold")
    with pytest.raises(ValueError, match="max_target: an option of sequence_task cold"):
        PrepareConfig(dataset="movielens-sequences", sequence_task="pretrain", max_target=2)
    with pytest.raises(UserError, match=r"target_genres: \['Jazz'\] not genre"):
        prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml100k_dir),), sequence_task="cold",
                              target_genres=("Jazz",)), tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="99 \\+ max_target"):  # Film-Noir alone: 24 target items on ML-100K
        prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml100k_dir),), sequence_task="cold",
                              target_genres=("Film-Noir",)), tmp_path / "x", progress=False)
    capsys.readouterr()
    assert main(["prepare", "--dataset", "movielens-sequences", "--sequence-task", "pretrain", "--input",
                 str(tmp_path), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown MovieLens layout" in err and err.count("\n") == 1
    assert main(["prepare", "--dataset", "movielens-sequences", "--sequence-task", "profile", "--input",
                 str(ml100k_dir), "--output", str(tmp_path / "p"), "--no-progress"]) == 0
    assert "ml-100k-sequences-profile" in capsys.readouterr().out


# -- the batch transform -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ml1m_pretrain(ml1m_partial_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml1m-seq") / "pretrain"
    return out, prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml1m_partial_dir),),
                                      sequence_task="pretrain"), out, progress=False)


def _loader(data, meta, config=None, split="train", **kwargs):
    transform = SequenceSampling(config, meta, split=split, **kwargs) if config is not None else None
    return BatchLoader(data, split, 256, shuffle=split == "train", seed=3, meta=meta, prefetch=0, transform=transform)


def _rows(kjt, key) -> list[list[int]]:
    jt = kjt[key]
    return [x.tolist() for x in torch.split(jt.values(), jt.lengths().tolist())]


def test_masking_rule_over_every_training_row(ml1m_pretrain):
    data, meta = ml1m_pretrain
    cfg = SequenceConfig(mask_rate=0.3, seed=7)
    plain, masked = _loader(data, meta), _loader(data, meta, cfg)
    counts = Counter()
    v = meta.field("items").vocab_size
    for a, b in zip(plain, masked, strict=True):
        assert b.sparse.keys() == a.sparse.keys() and torch.equal(b.labels["next_item"], a.labels["next_item"])
        for orig, new, tgt in zip(_rows(a.sparse, "items"), _rows(b.sparse, "items"), _rows(b.sparse, "targets")):
            assert len(new) == len(tgt) == len(orig)
            chosen = [k for k, t in enumerate(tgt) if t != 0]
            assert len(chosen) == max(1, int(np.floor(0.3 * len(orig) + 0.5)))  # round(0.3 L), at least 1
            assert all(tgt[k] == orig[k] for k in chosen)  # the original id at chosen positions, 0 elsewhere
            assert all(new[k] == orig[k] for k in range(len(orig)) if tgt[k] == 0)
            for k in chosen:
                counts["token" if new[k] == 1 else "same" if new[k] == orig[k] else "random"] += 1
                assert 1 <= new[k] < v
        assert b.sparse["negatives"].values().numel() == 0
    total = sum(counts.values())
    assert total > 40_000  # 47,288 chosen positions
    assert abs(counts["token"] / total - 0.8) < 0.01
    assert abs(counts["random"] / total - 0.1) < 0.01 and abs(counts["same"] / total - 0.1) < 0.01


def test_negatives_tokens_determinism_and_resume(ml1m_pretrain):
    data, meta = ml1m_pretrain
    v = meta.field("items").vocab_size
    cfg = SequenceConfig(negatives=1000, mask_rate=0.3, token="both", seed=1)
    loader = _loader(data, meta, cfg)
    plain = _loader(data, meta)
    pools = []
    for a, b in zip(plain, loader, strict=True):
        n = b.batch_size
        neg = b.sparse["negatives"]
        assert neg.values().numel() == 1000 and neg.lengths().tolist() == [1000 // n + (k < 1000 % n)
                                                                          for k in range(n)]
        assert int(neg.values().min()) >= 2 and int(neg.values().max()) <= v - 1
        pools.append(neg.values())
        for orig, new, tgt in zip(_rows(a.sparse, "items"), _rows(b.sparse, "items"), _rows(b.sparse, "targets")):
            assert len(new) == len(orig) + 2 and new[0] == new[-1] == 1 and tgt[0] == tgt[-1] == 0
            assert len(tgt) == len(new)
    pool = torch.cat(pools)
    assert abs(pool.float().mean().item() - (2 + v - 1) / 2) < 0.02 * v  # uniform over 2..V-1
    # the same batches again; the next epoch differs; resuming mid-epoch gives the rest of that epoch exactly
    def epoch(ld, e, start=0):
        ld.set_epoch(e, start)
        return [(b.sparse.values().clone(), b.sparse.lengths().clone()) for b in ld]

    again = _loader(data, meta, cfg)
    first, second = epoch(again, 1), epoch(_loader(data, meta, cfg), 1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, second, strict=True))
    other = epoch(_loader(data, meta, cfg), 2)
    assert not torch.equal(first[0][0], other[0][0])
    resumed = epoch(_loader(data, meta, cfg), 1, start=5)
    assert len(resumed) == len(first) - 5
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first[5:], resumed, strict=True))


def test_popularity_sampler_draws_by_count_and_weights_every_value_with_log_q(ml1m_pretrain):
    """sampler popularity (power 0.75) on ML-1M-partial: the pooled draws of a whole epoch follow
    q ~ (training count + 1)^0.75 (the most popular decile's share within 1 point of its expectation, the counts of
    the 20 most popular items within 5 sigma), and every value of every feature carries log(S q(id)) as its weight
    (0 at the reserved ids)."""
    data, meta = ml1m_pretrain
    v = meta.field("items").vocab_size
    counts = np.asarray(meta.field("items").frequencies, dtype=np.float64)
    q = sequences.popularity_distribution(meta.field("items").frequencies, 0.75)
    want = np.zeros(v)
    want[2:] = (counts[2:] + 1) ** 0.75
    np.testing.assert_allclose(q, want / want.sum(), rtol=1e-12)
    assert q[0] == q[1] == 0
    s = 2000
    loader = _loader(data, meta, SequenceConfig(negatives=s, sampler="popularity", sampler_power=0.75, seed=2,
                                                token="end"))
    drawn = np.zeros(v)
    for b in loader:
        kjt = b.sparse
        values, weights = kjt.values().numpy(), kjt.weights().numpy()
        expect = np.where(values >= 2, np.log(s * q[values].clip(1e-300)), 0.0)
        np.testing.assert_allclose(weights, expect, rtol=1e-5, atol=1e-5)
        drawn += np.bincount(kjt["negatives"].values().numpy(), minlength=v)
    n = drawn.sum()
    assert n == s * len(loader)
    top = np.argsort(-q)[:20]
    assert np.all(np.abs(drawn[top] - n * q[top]) < 5 * np.sqrt(n * q[top]))
    decile = np.argsort(-q)[: (v - 2) // 10]
    assert abs(drawn[decile].sum() / n - q[decile].sum()) < 0.01
    assert q[decile].sum() > 0.3  # far from uniform's 0.1: the test can tell the two apart
    with pytest.raises(ValueError, match="sampler"):
        SequenceConfig(negatives=5, sampler="zipf")
    with pytest.raises(ValueError, match="sampler_power"):
        SequenceConfig(negatives=5, sampler_power=0.5)  # power without the popularity sampler


def test_evaluation_batches_get_tokens_only(ml1m_pretrain):
    data, meta = ml1m_pretrain
    cfg = SequenceConfig(negatives=64, mask_rate=0.3, token="end")
    plain, ev = _loader(data, meta, split="valid"), _loader(data, meta, cfg, split="valid")
    for a, b in zip(plain, ev, strict=True):
        assert [r + [1] for r in _rows(a.sparse, "items")] == _rows(b.sparse, "items")
        assert b.sparse["negatives"].values().numel() == 0 and b.sparse["targets"].values().numel() == 0
    with_neg = next(iter(_loader(data, meta, cfg, split="valid", negatives=True)))
    assert with_neg.sparse["negatives"].values().numel() == 64


def test_sequence_config_and_trainer_wiring(ml1m_pretrain, ml100k_prepared, tmp_path):
    from recsys_transfer.train.run import sequence_transform

    data, meta = ml1m_pretrain
    for bad, match in (({"negatives": -1}, "negatives"), ({"mask_rate": 1.5}, "mask_rate"),
                       ({"token": "start"}, "token"), ({"negatives": True}, "negatives")):
        with pytest.raises(ValueError, match=match):
            SequenceConfig(**bad)
    with pytest.raises(UserError, match=r"sequence: unknown key\(s\) \['mask'\]"):
        build(RunConfig, {"data": {"path": "x"}, "sequence": {"mask": 0.3}}, "sequence")
    cfg = build(RunConfig, {"data": {"path": str(data)}, "sequence": {"negatives": 8, "mask_rate": 0.2,
                                                                      "token": "end"}}, "c")
    full = (TaskSpec(name="next", label="next_item", kind="retrieval", candidates="full"),)
    train, valid = (sequence_transform(cfg, meta, full, s) for s in ("train", "valid"))
    assert (train.mask, train.negatives) == (True, True) and (valid.mask, valid.negatives) == (False, False)
    sampled = (TaskSpec(name="next", label="next_item", kind="retrieval", candidates="sampled"),)
    valid = sequence_transform(cfg, meta, sampled, "valid")  # a task evaluated on sampled candidates
    assert (valid.mask, valid.negatives) == (False, True)
    assert sequence_transform(build(RunConfig, {"data": {"path": "x"}}, "c"), meta, meta.tasks, "train") is None
    with pytest.raises(UserError, match="no list field"):  # a dataset that is not a sequence dataset
        sequence_transform(cfg, ml100k_prepared[1], ml100k_prepared[1].tasks, "train")
    from recsys_transfer.config import config_differences

    current = json.loads(json.dumps(build(RunConfig, {"data": {"path": "x"}}, "c").to_dict()))
    before = {k: v for k, v in current.items() if k != "sequence"}  # a checkpoint from before the section
    assert config_differences(before, current) == []
    assert config_differences(before, json.loads(json.dumps(cfg.to_dict())))  # but a used section differs
    for t in ("pretrain", "profile", "cold"):  # the shipped pipelines parse, with their sequence sections
        pipe = load_config(ROOT / "pipelines" / f"peterrec-{t}.yaml")
        assert pipe.data.prepare.sequence_task == t
        assert pipe.data.prepare.input == ("../shared/data/movielens-1m-partial",)


def test_docstring_examples_run():
    assert doctest.testmod(sequences, raise_on_error=False).failed == 0


def test_meta_json_records_the_protocol(source):
    _, _, _, prepared = source
    out, meta = prepared["cold"]
    d = json.loads((out / "meta.json").read_text())
    assert d["source"]["target_genres"] == ["Documentary", "Horror"] and d["source"]["max_target"] == 3
    assert d["source"]["eval_negatives"] == 99 and d["tasks"][0]["label"] == "target_item"
    assert [f["name"] for f in d["sparse"]] == ["items", "negatives", "targets", "eval_negatives"]


def test_items_negatives_and_targets_share_one_embedding_collection_table(ml1m_pretrain):
    """What make_ec builds from a sequence dataset's meta: one table t_items for items, negatives and targets (rows
    0 and 1 are the padding and the token), and a transformed batch looks up in it."""
    from recsys_transfer.modules.embedding import make_ec

    data, meta = ml1m_pretrain
    ec = make_ec(meta, 8, ["items", "negatives", "targets"])
    (config,) = ec.embedding_configs()
    assert config.name == "t_items" and config.num_embeddings == meta.field("items").vocab_size
    assert config.feature_names == ["items", "negatives", "targets"]
    batch = next(iter(_loader(data, meta, SequenceConfig(negatives=50, mask_rate=0.3, token="end"))))
    out = ec(batch.sparse)
    for key in ("items", "negatives", "targets"):
        assert out[key].values().shape == (batch.sparse[key].values().numel(), 8)
        assert torch.equal(out[key].lengths(), batch.sparse[key].lengths())


# rows, vocabularies and dataset id of every task, digested, as main (133382e) wrote them before prepare_sequences
# became a loader over the shared builder build_sequences (which table-sequences also uses)
DIGESTS = {"ml-100k": {"pretrain": "e484c105dc613d5e", "profile": "1703ff868d506c7f", "cold": "511001c930150968"},
           "ml-1m-partial": {"pretrain": "9e3dc31841903c60", "profile": "137623eb3e2bae45", "cold": "312442254f8549cb"}}


def test_outputs_are_unchanged_row_for_row(source):
    import hashlib

    name, _, _, prepared = source
    for task, (out, meta) in prepared.items():
        d = {split: read_split(out, split) for split in ("train", "valid", "test")}
        d["vocab"] = {p.stem: pq.read_table(p).to_pydict() for p in sorted((out / "vocab").glob("*.parquet"))}
        d["dataset_id"] = meta.dataset_id
        assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16] == DIGESTS[name][task], task
