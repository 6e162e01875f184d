import numpy as np

from lrd_dist.data.sequences import (
    DEV,
    TEST,
    TRAIN,
    Interactions,
    build_samples,
    order_and_split,
    sample_negatives,
    sample_rows,
    user_item_keys,
)


def test_histories_match_a_naive_construction() -> None:
    rng = np.random.default_rng(0)
    n = 500
    inter = Interactions(
        user=rng.integers(1, 30, n), item=rng.integers(1, 80, n).astype(np.int32), time=rng.integers(0, 50, n)
    )
    ordered = order_and_split(inter)
    rows = sample_rows(ordered)
    columns = build_samples(ordered, rows, max_history=4)
    sequences: dict[int, list[tuple[int, int, int]]] = {}
    for index, (u, i, t) in enumerate(zip(inter.user, inter.item, inter.time, strict=True)):
        sequences.setdefault(int(u), []).append((int(t), index, int(i)))
    expected = []
    for user in sorted(sequences):
        items = [i for _, _, i in sorted(sequences[user])]
        for position in range(1, len(items)):
            history = items[max(0, position - 4) : position]
            expected.append((user, items[position], tuple(history + [0] * (4 - len(history)))))
    got = [
        (int(u), int(t), tuple(h.tolist()))
        for u, t, h in zip(columns["user"], columns["target"], columns["history_items"], strict=True)
    ]
    assert got == expected


def test_leave_one_out_pins_the_first_item_to_train() -> None:
    inter = Interactions(
        user=np.array([1, 1, 2, 2, 2, 3]),
        item=np.array([1, 2, 1, 2, 3, 4], np.int32),
        time=np.array([5, 1, 1, 2, 3, 1]),
    )
    ordered = order_and_split(inter)
    assert ordered.item.tolist() == [2, 1, 1, 2, 3, 4]
    assert ordered.split.tolist() == [TRAIN, TEST, TRAIN, DEV, TEST, TRAIN]


def test_sampled_negatives_are_distinct_and_unseen() -> None:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(1, 201), 30)
    items = np.concatenate([rng.choice(np.arange(1, 151), 30, replace=False) for _ in range(200)])
    keys = user_item_keys(users, items, 150)
    negatives = sample_negatives(np.arange(1, 201), 99, 150, keys, rng)
    assert negatives.shape == (200, 99)
    for user in range(200):
        row = negatives[user]
        assert len(set(row.tolist())) == 99
        assert not set(row.tolist()) & set(items[user * 30 : (user + 1) * 30].tolist())
        assert row.min() >= 1 and row.max() <= 150
    # roughly uniform over unseen items: no item is drawn far more than the others
    counts = np.bincount(negatives.ravel(), minlength=151)[1:]
    assert counts.max() < 2.0 * counts.mean()
