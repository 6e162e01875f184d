from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import Manifest
from lrd_dist.data.prepare import write_dataset
from lrd_dist.data.sources.movielens import GENRES_100K, load_movielens, year_bucket
from lrd_dist.data.stream import LoaderConfig, SequenceStream
from lrd_dist.errors import InputError


def _ratings(seed: int = 0, users: int = 30, items: int = 24, per_user: int = 12):
    """Every user rates 12 distinct items and every item gets 15 ratings, so all survive the 5-core."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, users + 1):
        chosen = [(user + 2 * k) % items + 1 for k in range(per_user)]
        times = 880_000_000 + np.sort(rng.choice(10_000, size=per_user, replace=False)) * 3600
        rows += [(user, int(i), int(rng.integers(1, 6)), int(t)) for i, t in zip(chosen, times, strict=True)]
    return rows


def write_ml100k(directory: Path, items: int = 24) -> list[tuple[int, int, int, int]]:
    directory.mkdir(parents=True)
    rows = _ratings(items=items)
    (directory / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    lines = []
    for item in range(1, items + 1):
        flags = ["0"] * 19
        flags[1 + item % 18] = "1"
        if item % 5 == 0:
            flags[8] = "1"
        title = f"Caf\xe9 Movie {item} ({1930 + item * 2})"
        lines.append("|".join([str(item), title, "01-Jan-1995", "", "http://x", *flags]))
    (directory / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return rows


def write_ml1m(directory: Path, items: int = 24) -> None:
    directory.mkdir(parents=True)
    rows = _ratings(seed=1, items=items)
    (directory / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    (directory / "movies.dat").write_bytes(
        "".join(f"{i}::Film {i} ({1980 + i})::Comedy|Drama\n" for i in range(1, items + 1)).encode("latin-1")
    )


def test_ml100k_leave_one_out_and_sampled_negatives(tmp_path: Path) -> None:
    rows = write_ml100k(tmp_path / "ml-100k")
    catalog, interactions, stats = load_movielens(tmp_path / "ml-100k")
    assert stats["variant"] == "ml-100k" and catalog.num_items == 24
    first_text = catalog.texts[0].as_py()
    assert first_text.startswith("Caf\xe9 Movie 1 (1932)") and first_text.endswith("Adventure")
    assert catalog.attributes["year"][0] == year_bucket(1932) == 1
    assert catalog.attributes["genre_drama"][4] == 1  # item 5 has Drama
    manifest = write_dataset(
        tmp_path / "out",
        source="movielens",
        catalog=catalog,
        interactions=interactions,
        num_negatives=10,
        seed=7,
        max_history=20,
    )
    assert manifest.samples == {"train": 30 * 9, "dev": 30, "test": 30}  # 12 - first - dev - test
    users = pq.read_table(tmp_path / "out" / "users.parquet").to_pylist()
    assert [u["source_id"] for u in users] == [str(u) for u in sorted({r[0] for r in rows})]  # GroupLens ids
    assert [u["user_id"] for u in users] == list(range(1, 31))

    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, i, _, t in rows:
        by_user.setdefault(u, []).append((t, i))
    config = LoaderConfig(batch_size=100, shuffle=False, max_history=20)
    for split, offset in (("test", -1), ("dev", -2)):
        batch = next(iter(SequenceStream(tmp_path / "out", split, config)))
        for user, target, negatives, length in zip(
            batch["user"].tolist(),
            batch["target"].tolist(),
            batch["negatives"].tolist(),
            batch["history_length"].tolist(),
            strict=True,
        ):
            ordered = [i for _, i in sorted(by_user[user])]
            assert target == ordered[offset]  # the last item is test, the one before is dev
            assert length == len(ordered) + offset
            assert len(set(negatives)) == 10  # without replacement
            assert not set(negatives) & set(ordered)  # outside the user's own items
            assert all(1 <= n <= 24 for n in negatives)


def test_negatives_are_seeded(tmp_path: Path) -> None:
    write_ml100k(tmp_path / "ml")
    catalog, interactions, _ = load_movielens(tmp_path / "ml")
    negatives = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_dataset(
            tmp_path / name,
            source="movielens",
            catalog=catalog,
            interactions=interactions,
            num_negatives=10,
            seed=seed,
        )
        negatives.append(
            next(iter(SequenceStream(tmp_path / name, "dev", LoaderConfig(shuffle=False))))["negatives"]
        )
    assert np.array_equal(negatives[0], negatives[1])
    assert not np.array_equal(negatives[0], negatives[2])


def test_ml1m_format(tmp_path: Path) -> None:
    write_ml1m(tmp_path / "ml-1m")
    catalog, interactions, stats = load_movielens(tmp_path / "ml-1m")
    assert stats["variant"] == "ml-1m"
    assert catalog.texts[2].as_py() == "Film 3 (1983) Comedy Drama"
    assert set(catalog.attributes) == {"year", "genre_comedy", "genre_drama"}
    assert len(interactions) == 30 * 12


def test_k_core_filter_drops_rare_items(tmp_path: Path) -> None:
    rows = write_ml100k(tmp_path / "ml")
    with open(tmp_path / "ml" / "u.data", "a") as handle:
        handle.write("1\t25\t3\t999999999\n")  # item 25 rated once
    with open(tmp_path / "ml" / "u.item", "ab") as handle:
        handle.write(("25|Rare (1990)|x||x|" + "|".join(["0"] * 18 + ["1"]) + "\n").encode("latin-1"))
    catalog, _, stats = load_movielens(tmp_path / "ml")
    assert catalog.num_items == 24 and stats["kept_ratings"] == len(rows)
    assert GENRES_100K[-1] == "Western"


def test_missing_movielens_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"u\.data"):
        load_movielens(tmp_path / "empty")
    write_ml100k(tmp_path / "ml")
    (tmp_path / "ml" / "u.item").unlink()
    with pytest.raises(InputError, match=r"u\.item"):
        load_movielens(tmp_path / "ml")


def test_catalog_round_trip(tmp_path: Path) -> None:
    write_ml1m(tmp_path / "ml")
    catalog, interactions, _ = load_movielens(tmp_path / "ml")
    write_dataset(
        tmp_path / "o", source="movielens", catalog=catalog, interactions=interactions, num_negatives=5
    )
    again = Catalog.read(tmp_path / "o" / "catalog.parquet")
    assert again.texts.to_pylist() == catalog.texts.to_pylist()
    assert Manifest.load(tmp_path / "o").attributes == list(catalog.attributes)
