"""Small-sample statistics of the seed-replicated studies (u_nft/study_stats.py) against known values."""
import math

import pytest

from u_nft.study_stats import (crossing_summary, first_crossing, mean_interval, paired_t_test, sign_flip_test,
                               student_t_cdf, student_t_quantile)


@pytest.mark.parametrize("df, quantile", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157),
                                          (30, 2.042272)])
def test_t_quantile_matches_the_table_values(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-5)
    assert student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=1e-5)


def test_t_cdf_is_symmetric_and_tends_to_the_normal():
    assert student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert student_t_cdf(1.3, 5) + student_t_cdf(-1.3, 5) == pytest.approx(1.0)
    assert student_t_cdf(1.959964, 1e6) == pytest.approx(0.975, abs=1e-5)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi


def test_mean_interval_is_the_t_interval():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == pytest.approx(2.0) and iv.std == pytest.approx(1.0)
    assert iv.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((2.0 - iv.half_width, 2.0 + iv.half_width))
    single = mean_interval([0.4])
    assert single.mean == 0.4 and math.isinf(single.half_width)


def test_paired_t_test_matches_a_hand_computation():
    a, b = [0.6, 0.7, 0.65, 0.8, 0.75], [0.5, 0.55, 0.6, 0.62, 0.6]
    d = [x - y for x, y in zip(a, b)]  # 0.1, 0.15, 0.05, 0.18, 0.15
    m = sum(d) / 5
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 4)
    result = paired_t_test(a, b)
    assert result["t"] == pytest.approx(m / (s / math.sqrt(5)))
    assert result["df"] == 4
    assert result["p"] == pytest.approx(2 * (1 - student_t_cdf(result["t"], 4)))
    assert result["p"] < 0.01
    assert paired_t_test([1, 2], [1, 2])["p"] == 1.0


def test_sign_flip_test_is_exact():
    # five positive differences: only the observed pattern and its mirror reach |sum| -> p = 2/32
    result = sign_flip_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert result["p"] == pytest.approx(2 / 32) and result["p_min"] == pytest.approx(1 / 16)
    # +1, -1: sums over the 4 patterns are 0, 2, -2, 0; observed |0| is reached by all -> p = 1
    assert sign_flip_test([1, 0], [0, 1])["p"] == 1.0
    # one difference larger than the rest together: flipping a small one never lowers |sum| below observed
    result = sign_flip_test([10, 1, 1], [0, 0, 0])
    assert result["p"] == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="equally long"):
        sign_flip_test([1, 2], [1])


def test_epochs_to_threshold_with_its_spread():
    curves = [[0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.4, 0.55], [0.1, 0.1, 0.2, 0.3]]
    assert first_crossing(curves[0], 0.5) == 2
    summary = crossing_summary(curves, 0.5)
    assert summary["per_seed"] == [2, 3, None]
    assert summary["reached"] == 2 and summary["median"] == 2.5 and (summary["min"], summary["max"]) == (2, 3)
    assert summary["censored_mean"] == pytest.approx((2 + 3 + 4) / 3)
    none = crossing_summary([[0.0, 0.1]], 0.5)
    assert none["reached"] == 0 and none["median"] is None
