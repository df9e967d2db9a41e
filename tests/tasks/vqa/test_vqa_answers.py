"""VQA answer normalisation and soft scores."""
import pytest

from villa_plugin.tasks.vqa.answers import count_score, normalize_answer, soft_target


@pytest.mark.parametrize("raw,norm", [("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("1,000", "1000"),
                                      ("dont know", "don't know"), ("3.5", "3.5"), ("a red-car", "red car"),
                                      ("  none\n", "0")])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_count_scores():
    assert [count_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert [count_score(c, "min3") for c in range(5)] == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0]
    with pytest.raises(ValueError):
        count_score(1, "vote")


def test_butd_scores_equal_leave_one_out_official_accuracy():
    """0/.3/.6/.9/1 is min(1, matches/3) averaged over the 10 sets of 9 annotators."""
    for count in range(11):
        subsets = [min(1.0, (count - (i < count)) / 3.0) for i in range(10)]
        assert count_score(count) == pytest.approx(sum(subsets) / 10, abs=1e-9)


def test_soft_target_keeps_vocabulary_answers_sorted_by_label():
    ans2label = {"no": 0, "yes": 1, "2": 2}
    target = soft_target(["yes"] * 5 + ["two", "2", "no", "maybe", "maybe"], ans2label)
    assert target == {"labels": [0, 1, 2], "scores": [0.3, 1.0, 0.6]}
    assert soft_target(["blue"] * 10, ans2label) == {"labels": [], "scores": []}
