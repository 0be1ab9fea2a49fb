/**
 * The same calls on a private Redis Cluster (started by the Python helpers), reached through one
 * node's URL: the client detects the cluster and sends each service's keys to the node of its slot,
 * and a sharded service's calls to its shards, on three primaries.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { BadArguments, CallTimeout, type Client, RemoteError, connect } from "titan-broker";

import { PythonCluster, Worker, connectAny, entriesAdded, shardScopes, waitFor } from "./helpers.js";

const K = 3;

type Plain = Awaited<ReturnType<typeof connectAny>>;

function scopes(service: string): string[] {
  return shardScopes(service, K);
}

/** The primary ("host:port") that serves `key`, from the cluster's slot map. */
async function primaryOf(redis: Plain, key: string): Promise<string> {
  const slot = Number(await redis.call("CLUSTER", "KEYSLOT", key));
  const ranges = (await redis.call("CLUSTER", "SLOTS")) as Array<[number, number, [string, number]]>;
  const found = ranges.find(([lo, hi]) => slot >= lo && slot <= hi);
  if (found === undefined) throw new Error(`no node serves slot ${slot}`);
  return `${found[2][0]}:${found[2][1]}`;
}

/** A name `<base>-<n>` whose K shards' calls streams are on K different primaries. */
async function spreadName(redis: Plain, base: string): Promise<string> {
  for (let n = 0; n < 1000; n++) {
    const name = `${base}-${n}`;
    const owners = await Promise.all(scopes(name).map((s) => primaryOf(redis, `titan:{${s}}:calls`)));
    if (new Set(owners).size === K) return name;
  }
  throw new Error(`no name ${base}-<n> puts its ${K} shards on ${K} primaries`);
}

/** How many calls were ever added to the stream of the shard `scope`. */
function added(redis: Plain, scope: string): Promise<number> {
  return entriesAdded(redis, `titan:{${scope}}:calls`);
}

interface Calculator {
  add(a: number, b: number): Promise<number>;
  divide(a: number, b: number): Promise<number>;
  factorial(n: number): Promise<number | bigint>;
}

describe("calls on a Redis Cluster", () => {
  let cluster: PythonCluster;
  const workers: Worker[] = [];
  let client: Client;
  let plain: Plain;
  let shardedCalc: string;
  let shardedStreamer: string;

  before(async () => {
    cluster = await PythonCluster.start();
    plain = await connectAny(cluster.url);
    shardedCalc = await spreadName(plain, "calculator");
    shardedStreamer = await spreadName(plain, "streamer");
    const sharded = ["--shards", String(K), "--concurrency", "8"];
    workers.push(
      ...(await Promise.all([
        Worker.start("processes/calculator.py", cluster.url, "calculator"),
        Worker.start("tests/services/streamer.py", cluster.url, "streamer"),
        Worker.start("tests/services/typed.py", cluster.url, "typed"),
        Worker.start("processes/calculator.py", cluster.url, shardedCalc, ["--name", shardedCalc, ...sharded]),
        Worker.start("tests/services/streamer.py", cluster.url, shardedStreamer, ["--name", shardedStreamer, ...sharded]),
      ])),
    );
    client = await connect(cluster.url);
  });

  after(async () => {
    await client?.close();
    await Promise.all(workers.map((w) => w.stop()));
    plain?.disconnect();
    await cluster?.stop();
  });

  it("detects the cluster from one node's URL", () => {
    assert.equal(client.topology.kind, "cluster");
  });

  it("returns results and errors", async () => {
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.add(5, 3), 8);
    assert.equal(await calc.factorial(22), 1124000727777607680000n);
    await assert.rejects(calc.divide(1, 0), (e: unknown) => e instanceof RemoteError && e.type === "ValueError");
    await assert.rejects(client.service<{ add(a: string, b: number): Promise<number> }>("calculator").add("x", 1), BadArguments);
    await assert.rejects(client.service<{ x(): Promise<void> }>("ghost", { timeout: 0.3 }).x(), CallTimeout);
  });

  it("carries datetimes both ways", async () => {
    const typed = client.service<{ shift(when: Date, by: string): Promise<Date> }>("typed");
    const shifted = await typed.shift(new Date("2030-01-01T00:00:00Z"), "P1D");
    assert.equal(shifted.toISOString(), "2030-01-02T00:00:00.000Z");
  });

  it("streams, and stops a stream left early", async () => {
    const streamer = client.service<{ numbers(n: number): AsyncIterable<number>; ticks(): AsyncIterable<number> }>("streamer");
    const seen: number[] = [];
    for await (const n of streamer.numbers(100)) seen.push(n);
    assert.equal(seen.length, 100);
    let count = 0;
    for await (const _ of streamer.ticks()) if (++count === 3) break;
    assert.equal(count, 3);
  });

  it("runs a job", async () => {
    const calc = client.service<Calculator>("calculator");
    const job = await client.submit(calc, "add", [2, 2], { delay: 0.2 });
    assert.equal(await client.job(job.id).result({ timeout: 10 }), 4);
  });

  it("makes 1,000 concurrent calls", async () => {
    const calc = client.service<Calculator>("calculator");
    const results = await Promise.all(Array.from({ length: 1000 }, (_, i) => calc.add(i, 1)));
    assert.deepEqual(results, Array.from({ length: 1000 }, (_, i) => i + 1));
  });

  it("spreads a sharded service's calls over the primaries of its shards", async () => {
    const calc = client.service<Calculator>(shardedCalc);
    let warm = 0;
    await waitFor("a call on a shard other than the first", async () => {
      assert.equal(await calc.add(warm++, 0), warm - 1);
      return (await added(plain, `${shardedCalc}#1`)) + (await added(plain, `${shardedCalc}#2`)) > 0;
    }, 10_000);
    const before = await Promise.all(scopes(shardedCalc).map((s) => added(plain, s)));
    const results: number[] = [];
    for (let wave = 0; wave < 30; wave++) {
      const batch = Array.from({ length: 10 }, (_, j) => wave * 10 + j);
      results.push(...(await Promise.all(batch.map((i) => calc.add(i, 1)))));
    }
    assert.deepEqual(results, Array.from({ length: 300 }, (_, i) => i + 1));
    const now = await Promise.all(scopes(shardedCalc).map((s) => added(plain, s)));
    const spread = now.map((n, k) => n - before[k]!);
    assert.equal(spread.reduce((a, b) => a + b, 0), 300, `entries added per shard: ${spread.join(", ")}`);
    for (const n of spread) assert.ok(n >= 90, `round-robin gives each shard about 100 calls: ${spread.join(", ")}`);
    const owners = await Promise.all(scopes(shardedCalc).map((s) => primaryOf(plain, `titan:{${s}}:calls`)));
    assert.equal(new Set(owners).size, K, `the shards' primaries: ${owners.join(", ")}`);
  });

  it("sends calls for several primaries in the same turn", async () => {
    // A call with a key goes to the first shard, the others to the next shard in turn: over K
    // turns, some turns send to two primaries at once.
    for (let i = 0; i < K; i++) {
      const results = await Promise.all([
        client.call(shardedCalc, "add", [i, 1]),
        client.call(shardedCalc, "add", [i, 2], {}, { key: `user-${i}` }),
        client.call("calculator", "add", [i, 3]),
        client.call("typed", "shift", [new Date("2030-01-01T00:00:00Z"), "P1D"]),
      ]);
      assert.deepEqual(results.slice(0, 3), [i + 1, i + 2, i + 3]);
    }
  });

  it("streams from every shard of a sharded service", async () => {
    const streamer = client.service<{ numbers(n: number): AsyncIterable<number>; ticks(): AsyncIterable<number> }>(shardedStreamer);
    await waitFor("a stream on a shard other than the first", async () => {
      for await (const _ of streamer.numbers(1)) void _;
      return (await added(plain, `${shardedStreamer}#1`)) + (await added(plain, `${shardedStreamer}#2`)) > 0;
    }, 10_000);
    const before = await Promise.all(scopes(shardedStreamer).map((s) => added(plain, s)));
    for (let i = 0; i < K; i++) {
      const seen: number[] = [];
      // Past one credit window: the credit goes to the control keys in the shard's slot.
      for await (const n of streamer.numbers(100)) seen.push(n);
      assert.deepEqual(seen, Array.from({ length: 100 }, (_, j) => j));
    }
    for (let i = 0; i < K; i++) {
      let count = 0;
      for await (const _ of streamer.ticks()) if (++count === 3) break;
      assert.equal(count, 3);
    }
    const now = await Promise.all(scopes(shardedStreamer).map((s) => added(plain, s)));
    assert.deepEqual(now.map((n, k) => n - before[k]!), [2, 2, 2]);
  });
});
