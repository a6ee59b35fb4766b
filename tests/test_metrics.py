"""Hand-computed tests for dgm_tf.metrics."""

import json

import numpy as np
import pytest

from dgm_tf import metrics

# The running example: 3 tasks, rows = after training task i.
# Task 0 improves slightly after task 1 (0.90 -> 0.95), so forgetting (which uses the
# best earlier accuracy) and BWT (which uses the diagonal) differ.
R_LIST = [
    [0.90, None, None],
    [0.95, 0.80, None],
    [0.50, 0.70, 0.95],
]
# Hand computation:
#   A_0 = 0.90
#   A_1 = (0.95 + 0.80) / 2          = 0.875
#   A_2 = (0.50 + 0.70 + 0.95) / 3   = 2.15 / 3 = 0.71666...
#   T = 2 (last row index)
#   f_0 = max(R[0][0], R[1][0]) - R[2][0] = max(0.90, 0.95) - 0.50 = 0.45
#   f_1 = max(R[1][1])          - R[2][1] = 0.80 - 0.70             = 0.10
#   f_2 = None (last task)
#   average forgetting = (0.45 + 0.10) / 2 = 0.275
#   BWT = 1/T * sum_{j<T} (R[T][j] - R[j][j]) = ((0.50 - 0.90) + (0.70 - 0.80)) / 2
#       = (-0.40 - 0.10) / 2 = -0.25
EXPECTED_A = [0.90, 0.875, 2.15 / 3]
EXPECTED_F = [0.45, 0.10, None]
EXPECTED_AVG_F = 0.275
EXPECTED_BWT = -0.25


def _assert_list_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            assert g == pytest.approx(e, abs=1e-12)


R_NAN = np.array([[0.90, np.nan, np.nan], [0.95, 0.80, np.nan], [0.50, 0.70, 0.95]])
R_RAGGED = [[0.90], [0.95, 0.80], [0.50, 0.70, 0.95]]
# Numbers above the diagonal are never read.
R_SQUARE_GARBAGE = np.array([[0.90, 0.3, 0.2], [0.95, 0.80, 0.1], [0.50, 0.70, 0.95]])


@pytest.mark.parametrize("R", [R_LIST, R_NAN, R_RAGGED, R_SQUARE_GARBAGE],
                         ids=["none", "nan_array", "ragged", "upper_ignored"])
def test_three_task_example(R):
    _assert_list_close(metrics.average_accuracy(R), EXPECTED_A)
    _assert_list_close(metrics.forgetting(R), EXPECTED_F)
    assert metrics.average_forgetting(R) == pytest.approx(EXPECTED_AVG_F, abs=1e-12)
    assert metrics.backward_transfer(R) == pytest.approx(EXPECTED_BWT, abs=1e-12)


def test_summary_matches_functions_and_is_json_ready():
    s = metrics.summary(R_NAN)
    assert set(s) == {"average_accuracy", "forgetting", "average_forgetting", "bwt"}
    _assert_list_close(s["average_accuracy"], EXPECTED_A)
    _assert_list_close(s["forgetting"], EXPECTED_F)
    assert s["average_forgetting"] == pytest.approx(EXPECTED_AVG_F)
    assert s["bwt"] == pytest.approx(EXPECTED_BWT)
    # Plain Python floats / None only: strict JSON must accept it.
    assert all(type(v) is float for v in s["average_accuracy"])
    json.dumps(s, allow_nan=False)


def test_negative_forgetting_when_a_task_improves():
    # f_0 = max(0.6) - 0.8 = -0.2 ; BWT = (0.8 - 0.6) / 1 = +0.2
    R = [[0.6, None], [0.8, 0.9]]
    assert metrics.forgetting(R)[0] == pytest.approx(-0.2)
    assert metrics.backward_transfer(R) == pytest.approx(0.2)
    # A_1 = (0.8 + 0.9) / 2 = 0.85
    assert metrics.average_accuracy(R) == pytest.approx([0.6, 0.85])


@pytest.mark.parametrize("R", [[[0.7]], [[0.7, None, None]], np.array([[0.7]]), np.array([[0.7, np.nan]])])
def test_single_task(R):
    assert metrics.average_accuracy(R) == [pytest.approx(0.7)]
    assert metrics.forgetting(R) == [None]
    assert metrics.average_forgetting(R) is None
    assert metrics.backward_transfer(R) is None
    assert metrics.summary(R) == {
        "average_accuracy": [pytest.approx(0.7)],
        "forgetting": [None],
        "average_forgetting": None,
        "bwt": None,
    }


def test_bwt_divisor_is_number_of_tasks_minus_one():
    # 4 tasks (T = 3), each earlier task loses exactly 0.3: BWT = 3 * (-0.3) / 3 = -0.3.
    R = [[1.0], [0.9, 1.0], [0.8, 0.9, 1.0], [0.7, 0.7, 0.7, 1.0]]
    assert metrics.backward_transfer(R) == pytest.approx(-0.3)
    # Forgetting: best earlier is 1.0 for each, final 0.7 -> 0.3 each.
    _assert_list_close(metrics.forgetting(R), [0.3, 0.3, 0.3, None])
    assert metrics.average_forgetting(R) == pytest.approx(0.3)


def test_integer_and_numpy_scalar_entries_accepted():
    R = [[1], [np.float32(0.5), 0]]
    assert metrics.average_accuracy(R) == pytest.approx([1.0, 0.25])


@pytest.mark.parametrize(
    "R, match",
    [
        ([], "empty"),
        (np.zeros((0, 0)), "empty"),
        (np.zeros((2, 2, 2)), "2-D"),
        ("abc", "list of rows"),
        ([[0.5], [0.5]], r"row 1 .*at least 2"),
        ([[0.5], [0.5, 0.5], [0.5, 0.5]], r"row 2 .*at least 3"),
        ([[]], r"row 0 .*at least 1"),
        ([[0.5], 0.5], r"row 1 .*sequence"),
        ([[0.5], [0.5, 1.5]], r"R\[1\]\[1\].*\[0, 1\]"),
        ([[0.5], [-0.1, 0.5]], r"R\[1\]\[0\].*\[0, 1\]"),
        ([[0.5], [None, 0.5]], r"R\[1\]\[0\].*number"),
        ([[0.5], [0.5, "0.5"]], r"R\[1\]\[1\].*number"),
        ([[True]], r"R\[0\]\[0\].*number"),
        (np.array([[0.5, np.nan], [np.nan, 0.5]]), r"R\[1\]\[0\]"),
        (np.array([[np.inf]]), r"R\[0\]\[0\]"),
    ],
)
def test_malformed_matrices_raise(R, match):
    for fn in (metrics.average_accuracy, metrics.forgetting, metrics.average_forgetting,
               metrics.backward_transfer, metrics.summary):
        with pytest.raises(ValueError, match=match):
            fn(R)


def test_accuracy_from_predictions():
    # 3 of 4 correct -> 0.75
    assert metrics.accuracy_from_predictions(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert isinstance(metrics.accuracy_from_predictions(np.array([1]), np.array([1])), float)
    with pytest.raises(ValueError, match="zero"):
        metrics.accuracy_from_predictions(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy_from_predictions(np.array([1, 2]), np.array([1, 2, 3]))


def test_task_aware_predictions_ignores_other_columns():
    logits = np.array(
        [
            # column 0 is the global max, but only columns 2 and 3 are allowed -> 3
            [9.0, 0.0, 1.0, 2.0],
            # column 1 is the global max; among {2, 3}, 2 wins
            [0.0, 9.0, 5.0, -1.0],
            # tie between 2 and 3 -> first listed label wins
            [0.0, 0.0, 4.0, 4.0],
        ]
    )
    np.testing.assert_array_equal(metrics.task_aware_predictions(logits, [2, 3]), [3, 2, 2])
    # order of the task's labels decides ties, result is still in the full label space
    np.testing.assert_array_equal(metrics.task_aware_predictions(logits, [3, 2]), [3, 2, 3])
    # unrestricted = plain argmax
    np.testing.assert_array_equal(metrics.task_aware_predictions(logits, range(4)), np.argmax(logits, 1))
    # the global argmax would be wrong here
    assert not np.array_equal(np.argmax(logits, 1), [3, 2, 2])


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros(4), [0], "2-D"),
        (np.zeros((2, 4)), [], "non-empty"),
        (np.zeros((2, 4)), [4], "out of range"),
        (np.zeros((2, 4)), [-1], "out of range"),
        (np.zeros((2, 4)), [0.5], "integers"),
    ],
)
def test_task_aware_predictions_validation(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.task_aware_predictions(logits, labels)
