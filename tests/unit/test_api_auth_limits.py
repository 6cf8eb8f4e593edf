"""The API's token buckets and the client address the bad-key limiter counts by."""

from types import SimpleNamespace

from headshots.api.auth import TokenBuckets, client_address


def test_a_bucket_with_its_own_capacity_refills_at_its_rate():
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    assert [buckets.take("a", 0.5, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 0.5, 3) == 2.0  # empty: the next token is due in 1 / rate seconds
    now[0] += 2.0
    assert buckets.wait_s("a", 0.5, 3) == 0.0 and buckets.wait_s("a", 0.5, 3) == 0.0  # looking takes nothing
    assert buckets.take("a", 0.5, 3) == 0.0 and buckets.take("a", 0.5, 3) > 0
    assert buckets.take("b", 0.5, 3) == 0.0  # names are apart


def test_looking_at_a_bucket_never_used_remembers_nothing_and_buckets_are_bounded():
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0], max_names=10)
    for index in range(100):
        assert buckets.wait_s(f"peer-{index}", 1.0, 5) == 0.0
    assert len(buckets._buckets) == 0
    for index in range(100):
        buckets.take(f"peer-{index}", 1.0, 5)
        now[0] += 10.0  # every earlier bucket has refilled: dropped when room is needed
    assert len(buckets._buckets) <= 10
    for index in range(5):
        buckets.take("guesser", 1.0, 5)
    assert buckets.take("guesser", 1.0, 5) > 0  # an empty bucket is kept while others come and go
    for index in range(8):
        buckets.take(f"other-{index}", 1.0, 5)
    assert buckets.take("guesser", 1.0, 5) > 0


def test_the_client_address_is_the_peer_and_an_ipv6_peer_counts_by_its_64():
    def request(host):
        return SimpleNamespace(client=SimpleNamespace(host=host) if host is not None else None)

    assert client_address(request("203.0.113.7")) == "203.0.113.7"
    assert client_address(request("::ffff:203.0.113.7")) == "203.0.113.7"
    assert client_address(request("2001:db8:1:2:aaaa::1")) == client_address(request("2001:db8:1:2:bbbb::2")) \
        == "2001:db8:1:2::/64"
    assert client_address(request("2001:db8:1:3::1")) != client_address(request("2001:db8:1:2::1"))
    assert client_address(request(None)) == "unknown" and client_address(request("testclient")) == "testclient"
