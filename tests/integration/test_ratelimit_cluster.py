"""The limiter and the key store run unchanged on a real local Redis Cluster (three masters)."""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from policies.config import Limits, RateLimitConfig, TenantConfig
from policies.errors import RateLimited
from policies.keys import ApiKey, RedisKeyStore, hash_key
from policies.limiter import Limiter
from tests.support.procs import Proc, start_redis


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, so at most 55535."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli is needed to form a cluster")
    procs: list[Proc] = []
    try:
        for _ in range(3):
            d: Path = tmp_path_factory.mktemp("node")
            port = _cluster_port()
            procs.append(start_redis(d, port, ["--cluster-enabled", "yes", "--cluster-config-file",
                                              str(d / "nodes.conf"), "--cluster-node-timeout", "2000"]))
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in procs),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        for _ in range(100):  # every node must agree before the first command
            states = [subprocess.run(["redis-cli", "-p", str(p.port), "cluster", "info"], capture_output=True,
                                     text=True, timeout=5, check=False).stdout for p in procs]
            if all("cluster_state:ok" in out for out in states):
                break
            time.sleep(0.1)
        yield procs[0].port
    finally:
        for p in procs:
            p.stop()


async def test_limits_and_keys_on_a_cluster(cluster: int) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster)
    try:
        # Tenants chosen so their hash tags land on different masters.
        tenants = {f"t{i}": TenantConfig(limits=Limits(rpm=2), models={"m": Limits(tpm=1000)}) for i in range(6)}
        slots = {RedisCluster.keyslot(client, f"{{t{i}}}") for i in range(6)}
        assert len({s * 3 // 16384 for s in slots}) > 1
        lim = Limiter(RateLimitConfig(), tenants)
        lim.attach(client)
        await lim.warm(client)
        for tenant in tenants:
            key = ApiKey(sha256=hash_key(tenant), name=tenant, tenant=tenant, limits=Limits(concurrency=5))
            first = await lim.reserve(key, "m", f"{tenant}-1", 100)
            assert first is not None and first.where == "redis"
            await lim.settle(first, 40)
            second = await lim.reserve(key, "m", f"{tenant}-2", 100)
            assert second is not None and second.verdict.remaining_tokens == 1000 - 40 - 100
            with pytest.raises(RateLimited):
                await lim.reserve(key, "m", f"{tenant}-3", 100)
        store = RedisKeyStore(client)
        text, created = await store.create(name="ci", tenant="t0")
        assert await store.get(hash_key(text)) == created
        signature = await store.signature()
        assert signature[1] == 1 and await store.hashes() == {created.sha256}
        assert [k.name for k in await store.revoke(created.id)] == ["ci"]
        assert await store.signature() not in (signature, (signature[0], 0)) and await store.hashes() == set()
    finally:
        await client.aclose()
