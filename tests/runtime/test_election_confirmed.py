"""What a leader publishes as its confirmed lsn (the bar a candidate must reach to campaign)."""

from types import SimpleNamespace

from broker.runtime.election import confirmed_lsn_of


def server(last: int, sync: int, acks: list[int]):
    links = {i: {"acked": a, "in_sync": True} for i, a in enumerate(acks)}
    repl = SimpleNamespace(sync_replicas=sync, links=links)
    repl.replica_lsn = lambda: sorted(acks, reverse=True)[sync - 1] if len(acks) >= sync else 0
    return SimpleNamespace(roles=SimpleNamespace(last_lsn=lambda: last), replication=repl)


def test_without_sync_replicas_a_lagging_follower_may_still_win():
    # The leader wrote up to 120; its only follower has 117.  Confirms promised only the leader's
    # disk, so the bar is what the follower has: it can campaign when the leader dies.
    assert confirmed_lsn_of(server(120, 0, [117]))() == 117
    assert confirmed_lsn_of(server(120, 0, [117, 119]))() == 119
    assert confirmed_lsn_of(server(120, 0, []))() == 0


def test_with_sync_replicas_the_bar_is_what_n_followers_have():
    assert confirmed_lsn_of(server(120, 1, [117, 119]))() == 119
    assert confirmed_lsn_of(server(120, 2, [117, 119]))() == 117
    assert confirmed_lsn_of(server(110, 1, [117]))() == 110  # never past the leader's own log


def test_sync_replicas_defaults_to_1_with_an_election_and_0_without():
    from broker.config import Config

    assert Config(election="etcd://127.0.0.1:2379/b").validate().sync_replicas == 1
    assert Config().validate().sync_replicas == 0
    assert Config(follow="127.0.0.1:7700").validate().sync_replicas == 0
    assert Config(election="etcd://127.0.0.1:2379/b", sync_replicas=0).validate().sync_replicas == 0
    assert Config(sync_replicas=2).validate().sync_replicas == 2
