"""The sliding-window rate on virtual time: exact for steady traffic, quick for newcomers,
smooth and complete decay when traffic stops."""

import pytest

from extproc.registry.rate import SlidingWindowRate

WINDOW = 60.0


def steady(rate: SlidingWindowRate, per_second: float, start: float, seconds: float) -> float:
    """Record `per_second` evenly spaced events from `start`; returns the time after the last."""
    step = 1.0 / per_second
    count = round(seconds * per_second)
    for i in range(count):
        rate.record(start + i * step)
    return start + count * step


@pytest.mark.parametrize("per_second", [0.5, 10.0, 250.0])
def test_steady_rate_is_exact_at_every_age(per_second: float) -> None:
    estimator = SlidingWindowRate(WINDOW, now=0.0)
    step = 1.0 / per_second
    t = 0.0
    checks = 0
    while t < 5 * WINDOW:
        estimator.record(t)
        t += step
        # Between events the estimate may sag by at most one event's worth.
        if t > 2.0 and round(t / step) % max(1, round(per_second)) == 0:
            assert estimator.rate(t) == pytest.approx(per_second, rel=0.02, abs=1 / WINDOW)
            checks += 1
    assert checks > 100


def test_new_workload_shows_its_true_rate_within_a_second() -> None:
    estimator = SlidingWindowRate(WINDOW, now=100.0)
    end = steady(estimator, 50.0, start=100.0, seconds=1.0)
    assert estimator.rate(end) == pytest.approx(50.0, rel=0.03)
    end = steady(estimator, 50.0, start=end, seconds=1.0)
    assert estimator.rate(end) == pytest.approx(50.0, rel=0.03)


def test_first_request_does_not_read_as_a_burst() -> None:
    estimator = SlidingWindowRate(WINDOW, now=0.0)
    estimator.record(0.0)
    assert estimator.rate(0.001) == pytest.approx(1.0)


def test_idle_workload_decays_smoothly_to_exactly_zero() -> None:
    estimator = SlidingWindowRate(WINDOW, now=0.0)
    stop = steady(estimator, 20.0, start=0.0, seconds=150.0)
    previous = estimator.rate(stop)
    assert previous == pytest.approx(20.0, rel=0.02)
    t = stop
    largest_step = 0.0
    while t < stop + 2 * WINDOW + 1:
        t += 0.01
        current = estimator.rate(t)
        assert current <= previous + 1e-9  # never rises while idle
        largest_step = max(largest_step, previous - current)
        previous = current
    assert previous == 0.0
    # Linear decay over one window: 20 req/s fall by 20/60 per second, 1/300 per 10 ms step.
    # A tumbling window would drop all 20 at once.
    assert largest_step < 0.01


def test_no_jump_at_bucket_boundaries_for_steady_traffic() -> None:
    estimator = SlidingWindowRate(WINDOW, now=0.0)
    readings = []
    step = 0.1
    for i in range(int(4 * WINDOW / step)):
        estimator.record(i * step)
        if i * step > 5:
            readings.append(estimator.rate(i * step + step / 2))
    assert max(readings) - min(readings) < 0.25  # steady 10 req/s stays within 2.5%


def test_workload_back_from_long_idle_shows_its_new_rate_quickly() -> None:
    estimator = SlidingWindowRate(WINDOW, now=0.0)
    end = steady(estimator, 5.0, start=0.0, seconds=100.0)
    restart = end + 3 * WINDOW
    assert estimator.rate(restart) == 0.0
    end = steady(estimator, 40.0, start=restart, seconds=1.5)
    assert estimator.rate(end) == pytest.approx(40.0, rel=0.05)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SlidingWindowRate(0.0, now=0.0)
