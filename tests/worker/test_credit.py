"""The worker's adaptive prefetch (client/worker/credit.py), pure: the bounds and the direction."""

from client.worker.credit import (CREDIT_INTERVAL, CREDIT_MAX_FACTOR, LONG_RUN_FACTOR, LONG_RUN_FLOOR,
                                 AdaptiveCredit)


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


def test_a_slot_busy_for_long_wants_nothing_waiting_for_it_while_its_task_still_runs():
    """The average learns only from finished tasks: without counting a running long task, a
    worker whose credit grew on fast tasks kept it (x64) for as long as the long task ran, and
    brokerd kept handing it deliveries that could only wait behind that task."""
    ac = AdaptiveCredit(1)
    assert settle(ac, 0.00002)[-1] == CREDIT_MAX_FACTOR  # grown on no-op tasks
    assert ac.long_after() == LONG_RUN_FLOOR  # x4 a few microseconds is below the floor
    assert ac.target(busy_long=1) == 1  # its one slot runs a long task: hold only that
    assert ac.due(1000.0, busy_long=1) == 1  # and it is sent (a drop to the slots always is)
    assert ac.due(1000.0 + CREDIT_INTERVAL, busy_long=1) is None  # once
    ac4 = AdaptiveCredit(4)
    settle(ac4, 0.00002)
    assert ac4.target(busy_long=1) == 1 + 3 * CREDIT_MAX_FACTOR  # the three others keep theirs
    assert ac4.target(busy_long=9) == 4  # never below the slots


def test_the_long_threshold_follows_the_average_run_time():
    ac = AdaptiveCredit(1)
    assert ac.long_after() == LONG_RUN_FLOOR  # nothing known yet
    settle(ac, 0.5)
    assert abs(ac.long_after() - LONG_RUN_FACTOR * 0.5) < 1e-6  # a 0.6 s run of 0.5 s tasks is not long


def test_wait_says_when_a_change_held_back_by_the_interval_may_go():
    ac = AdaptiveCredit(1)
    settle(ac, 0.00002)
    now = ac.next_at - CREDIT_INTERVAL / 2  # a CREDIT went out half an interval ago
    assert ac.wait(now) is None  # nothing to change
    assert ac.due(now, busy_long=1) is None  # too soon ...
    assert abs(ac.wait(now, busy_long=1) - CREDIT_INTERVAL / 2) < 1e-9  # ... the loop wakes then
    assert ac.due(now + CREDIT_INTERVAL / 2, busy_long=1) == 1
