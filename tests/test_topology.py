"""Reading a deployment's URL: a node's own URL keeps the user's credentials and TLS; sentinel URLs.

(The behaviour on a real cluster and behind real sentinels is in test_cluster.py and test_sentinel.py.)
"""

from __future__ import annotations

import pytest

from titan_broker._config import redact, url_user
from titan_broker._errors import ConfigError, RedisUnavailable
from titan_broker._redis.topology import Cluster, _sentinel_topology, discover

pytestmark = pytest.mark.anyio


def test_a_cluster_node_url_keeps_credentials_tls_and_options() -> None:
    url = "rediss://app:s%40cret@seed:7000?ssl_ca_certs=/ca.pem"
    topology = Cluster(url, node_scheme="rediss")
    assert (
        topology.node_url(("10.0.0.7", 7003)) == "rediss://app:s%40cret@10.0.0.7:7003?ssl_ca_certs=%2Fca.pem"
    )
    assert topology.node_url(("::1", 7001)).startswith("rediss://app:s%40cret@[::1]:7001")


def test_a_sentinel_url_names_its_sentinels_primary_db_and_sentinel_password() -> None:
    topology = _sentinel_topology(
        "redis+sentinels://:pw@s1:26379,s2,[::1]:26380/mymaster?db=3&sentinel_password=spw"
    )
    assert topology.kind == "sentinel"
    assert topology.sentinels == [("s1", 26379), ("s2", 26379), ("::1", 26380)]
    assert topology.master == "mymaster"
    assert topology.sentinel_auth == {"password": "spw"}
    # The primary's own URL: TLS, its credentials and db, never the sentinels' password.
    assert topology.node_url(("10.0.0.9", 6380)) == "rediss://:pw@10.0.0.9:6380/3"


def test_a_sentinel_url_without_a_primary_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="names the sentinels and one primary"):
        _sentinel_topology("redis+sentinel://:secret@s1:26379")


async def test_unreachable_sentinels_are_a_clear_error_without_the_password() -> None:
    with pytest.raises(RedisUnavailable) as info:
        await discover("redis+sentinel://:secret@127.0.0.1:1/mymaster")
    assert "mymaster" in str(info.value) and "secret" not in str(info.value)


def test_a_sentinel_url_with_several_hosts_and_passwords_is_redacted_whole() -> None:
    url = "redis+sentinel://app:S3CRET@s1:26379,s2:26380,s3:26381/mymaster?sentinel_password=SENTPW"
    shown = redact(url)
    assert "S3CRET" not in shown and "SENTPW" not in shown
    assert shown == "redis+sentinel://app:***@s1:26379,s2:26380,s3:26381/mymaster?sentinel_password=***"


@pytest.mark.parametrize(
    ("url", "at_fault"),
    [
        ("redis+sentinel://s1:99999/mymaster", "s1:99999"),
        ("redis+sentinel://s1:26379,/mymaster", "''"),
        ("redis+sentinel://s1:x/mymaster", "s1:x"),
        ("redis+sentinel://s1/mymaster/3", "one primary"),
        ("redis+sentinel://s1/mymaster?db=abc", "'abc'"),
    ],
)
def test_a_bad_part_of_a_sentinel_url_is_named(url: str, at_fault: str) -> None:
    with pytest.raises(ConfigError) as info:
        _sentinel_topology(url)
    assert at_fault in str(info.value)


def test_a_tls_sentinel_url_gives_the_primary_its_ca_like_the_channels() -> None:
    topology = _sentinel_topology("redis+sentinels://s1:26379/mymaster?ssl_ca_certs=/x/ca.crt&db=2")
    assert topology._node_options() == {"db": 2, "ssl": True, "ssl_ca_certs": "/x/ca.crt"}
    assert topology.node_url(("10.0.0.9", 6380)) == "rediss://10.0.0.9:6380/2?ssl_ca_certs=%2Fx%2Fca.crt"


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("redis://app%2Dweb:s3cret@host:6379/0", "app-web"),
        ("redis://host:6379/0?username=app&password=s3cret", "app"),  # a form redis-py reads too
        ("redis+sentinel://app:s3cret@s1:26379,s2:26379/mymaster", "app"),
        ("redis://:s3cret@host:6379/0", None),  # the default user
        ("unix:///run/redis.sock", None),
    ],
)
def test_the_acl_user_a_url_logs_in_as(url: str, user: str | None) -> None:
    assert url_user(url) == user
