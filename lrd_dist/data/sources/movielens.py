"""GroupLens MovieLens ml-100k (u.data, u.item) and ml-1m (ratings.dat, movies.dat), as distributed.

Following the LRD authors' preparation: exact duplicates dropped, iterative k-core, ids by sorted
original id, item text "<title (year)> <genre> <genre> ...", attributes ``year`` (bucketed as they
did) and one binary attribute per genre. MovieLens has no item-item relations.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from lrd_dist.data.catalog import Catalog, check_texts
from lrd_dist.data.sequences import Interactions
from lrd_dist.data.sources.common import dedupe, k_core
from lrd_dist.data.sources.tabular import read_delimited, require_file
from lrd_dist.errors import InputError

GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


def year_bucket(year: int) -> int:
    """The LRD notebook's buckets: <1940, 40s, 50s, 60s, 70s, 80-84, 85-89, then single years."""
    if year <= 0:
        return 0
    if year < 1940:
        return 1
    if year < 1980:
        return 2 + (year - 1940) // 10
    if year < 1990:
        return 6 + (year - 1980) // 5
    return 8 + (year - 1990)


def _read_movies(path: Path, separator: str, ml100k: bool) -> list[tuple[int, str, list[str]]]:
    movies = []
    with open(path, encoding="latin-1") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").split(separator)
            try:
                movie = int(fields[0])
                if ml100k:
                    flags = fields[5:24]
                    if len(flags) != 19:
                        raise ValueError("expected 24 '|' fields")
                    genres = [g for g, flag in zip(GENRES_100K, flags, strict=True) if flag == "1"]
                else:
                    if len(fields) != 3:
                        raise ValueError("expected MovieID::Title::Genres")
                    genres = [g for g in fields[2].split("|") if g]
            except (ValueError, IndexError) as exc:
                raise InputError(
                    path, f"malformed movie line ({exc})", "restore the GroupLens file", line=number
                ) from exc
            movies.append((movie, fields[1].strip(), genres))
    return movies


def load_movielens(directory: Path, min_interactions: int = 5) -> tuple[Catalog, Interactions, dict]:
    directory = Path(directory)
    if (directory / "u.data").is_file():
        ratings = read_delimited(
            directory / "u.data",
            {"user": pa.int64(), "item": pa.int64(), "time": pa.int64()},
            header=False,
            column_names=["user", "item", "rating", "time"],
        )
        movies = _read_movies(require_file(directory / "u.item", "u.item"), "|", ml100k=True)
        variant = "ml-100k"
    elif (directory / "ratings.dat").is_file():
        # '::' separated: read with ':' and take every other field.
        ratings = read_delimited(
            directory / "ratings.dat",
            {"user": pa.int64(), "item": pa.int64(), "time": pa.int64()},
            header=False,
            delimiter=":",
            column_names=["user", "_a", "item", "_b", "rating", "_c", "time"],
        )
        movies = _read_movies(require_file(directory / "movies.dat", "movies.dat"), "::", ml100k=False)
        variant = "ml-1m"
    else:
        raise InputError(
            directory,
            "neither u.data (ml-100k) nor ratings.dat (ml-1m) found",
            "point --input at an unpacked GroupLens MovieLens directory",
        )
    user = ratings.column("user").to_numpy()
    item = ratings.column("item").to_numpy()
    time = ratings.column("time").to_numpy()
    movie_ids = np.array([m[0] for m in movies])
    unknown = np.flatnonzero(~np.isin(item, movie_ids))
    if len(unknown):
        raise InputError(
            directory,
            f"rating of unknown movie {item[unknown[0]]}",
            "use matching GroupLens files",
            line=int(unknown[0]) + 1,
        )
    keep = dedupe(user, item, time)
    keep[keep] = k_core(user[keep], item[keep], min_interactions)
    user, item, time = user[keep], item[keep], time[keep]
    kept_movies = np.unique(item)
    by_id = {m[0]: m for m in movies}
    all_genres = sorted({g for m in movies for g in m[2]})
    texts, years = [], []
    genre_flags = {g: np.zeros(len(kept_movies), dtype=np.int64) for g in all_genres}
    for index, movie in enumerate(kept_movies.tolist()):
        _, title, genres = by_id[movie]
        texts.append(" ".join([title, *genres]))
        match = YEAR_RE.search(title)
        years.append(year_bucket(int(match.group(1))) if match else 0)
        for g in genres:
            genre_flags[g][index] = 1
    catalog = Catalog(
        source_ids=pa.array([str(m) for m in kept_movies.tolist()]),
        texts=pa.array(texts),
        attributes={"year": np.array(years, dtype=np.int64)}
        | {"genre_" + re.sub(r"\W", "", g).lower(): v for g, v in genre_flags.items()},
        relations={},
    )
    check_texts(catalog.texts, directory / ("u.item" if variant == "ml-100k" else "movies.dat"))
    dense_item = np.searchsorted(kept_movies, item) + 1
    users = np.unique(user)
    dense_user = np.searchsorted(users, user) + 1
    interactions = Interactions(
        user=dense_user, item=dense_item.astype(np.int32), time=time, user_source_ids=users
    )
    return (
        catalog,
        interactions,
        {
            "variant": variant,
            "min_interactions": min_interactions,
            "raw_ratings": len(keep),
            "kept_ratings": int(keep.sum()),
        },
    )
