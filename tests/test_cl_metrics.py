import pytest

from ds_cl.evaluation.cl_metrics import average_accuracy, backward_transfer, forward_transfer, summarize


def test_aa_bwt_hand_computed():
    r = [[0.9, None, None],
         [0.6, 0.8, None],
         [0.5, 0.7, 0.9]]
    assert average_accuracy(r) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    s = summarize(r, ["a", "b", "c"])
    assert s["final_scores"] == {"a": 0.5, "b": 0.7, "c": 0.9}


def test_fwt_needs_above_diagonal():
    r = [[0.9, 0.3], [0.8, 0.7]]
    assert forward_transfer(r, [0.1, 0.2]) == pytest.approx(0.3 - 0.2)
    assert forward_transfer([[0.9, None], [0.8, 0.7]], [0.1, 0.2]) is None


def test_single_task_and_bad_shapes():
    assert backward_transfer([[0.5]]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        average_accuracy([])
    with pytest.raises(ValueError, match="row 1"):
        average_accuracy([[0.1], [0.2]])
