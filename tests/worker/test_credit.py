"""The worker's adaptive prefetch (client/worker/credit.py), pure: the bounds and the direction."""

from client.worker.credit import CREDIT_INTERVAL, CREDIT_MAX_FACTOR, AdaptiveCredit


def settle(ac, runtime, n=50):
    now = 0.0
    sent = []
    for _ in range(n):
        ac.observe(runtime)
        now += CREDIT_INTERVAL
        new = ac.due(now)
        if new is not None:
            sent.append(new)
    return sent


def test_fast_tasks_grow_the_credit_to_concurrency_times_64_and_long_ones_bring_it_back():
    ac = AdaptiveCredit(2)
    assert ac.current == 2 and ac.due(0.0) is None  # nothing observed: hold what can start
    assert settle(ac, 0.00002)[-1] == 2 * CREDIT_MAX_FACTOR  # no-op tasks: the most
    assert settle(ac, 5.0)[-1] == 2  # long tasks: no more than the slots
    assert ac.current == 2


def test_the_credit_stays_within_its_bounds_and_is_sent_at_most_every_interval():
    ac = AdaptiveCredit(2000)  # 2000 x 64 is past brokerd's 65535: capped
    ac.observe(0.0)
    assert ac.due(1.0) == 65535
    ac.observe(10.0)
    assert ac.due(1.0 + CREDIT_INTERVAL / 2) is None  # too soon after the last CREDIT
    assert 2000 <= ac.due(1.0 + CREDIT_INTERVAL) <= 2010  # back near concurrency: runs of ~2 s
