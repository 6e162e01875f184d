import numpy as np
import pytest

from lrd_dist.evaluation.relations import nmi, purity


def test_nmi_and_purity_of_known_clusterings() -> None:
    truth = np.array([1, 1, 2, 2, 3, 3])
    assert nmi(np.array([5, 5, 0, 0, 9, 9]), truth) == pytest.approx(1.0)  # same partition, other labels
    assert purity(np.array([5, 5, 0, 0, 9, 9]), truth) == 1.0
    assert nmi(np.zeros(6, int), truth) == pytest.approx(0.0)  # one cluster carries no information
    assert purity(np.zeros(6, int), truth) == pytest.approx(1 / 3)
    # two of three classes merged: I = ln 3 - (2/3) ln 2, H = ln 3 and (2/3) ln 2 + (1/3) ln 3
    merged = np.array([0, 0, 0, 0, 1, 1])
    expected = (np.log(3) - 2 / 3 * np.log(2)) / ((np.log(3) + 2 / 3 * np.log(3 / 2) + 1 / 3 * np.log(3)) / 2)
    assert nmi(merged, truth) == pytest.approx(expected)


def test_nmi_of_independent_labels_is_near_zero() -> None:
    rng = np.random.default_rng(0)
    assert nmi(rng.integers(0, 4, 20_000), rng.integers(0, 4, 20_000)) < 0.01
