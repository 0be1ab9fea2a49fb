/**
 * A service sharded over 3 slots (`titan-worker run --shards 3`), called from Node: the calls spread
 * round-robin over the shards' streams and each is answered once, streams work on every shard,
 * calls with a key and jobs stay on the first shard, and an unsharded service is as before.
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { type Client, connect } from "titan-broker";

import { PrivateRedis, Worker, entriesAdded, shardScopes, waitFor } from "./helpers.js";

const K = 3;
const NS = "titan";

interface Tasks {
  add(a: number, b: number, tag?: string): Promise<number>;
}

interface Streamer {
  numbers(n: number): AsyncIterable<number>;
  ticks(): AsyncIterable<number>;
}

describe("a sharded service called from Node", () => {
  let redis: PrivateRedis;
  let plain: ReturnType<PrivateRedis["client"]>;
  let client: Client;
  const workers: Worker[] = [];
  const dir = mkdtempSync(join(tmpdir(), "titan-node-shards-"));
  const log = join(dir, "runs.log");
  const marker = join(dir, "stopped");

  /** How many calls were ever added to the stream of the shard `scope`. */
  function added(scope: string): Promise<number> {
    return entriesAdded(plain, `${NS}:{${scope}}:calls`);
  }

  function perShard(service: string): Promise<number[]> {
    return Promise.all(shardScopes(service, K).map((s) => added(s)));
  }

  before(async () => {
    redis = await PrivateRedis.start();
    plain = redis.client();
    const sharded = ["--shards", String(K), "--concurrency", "8"];
    workers.push(
      ...(await Promise.all([
        Worker.start("tests/services/tasks.py", redis.url, "tasks", [...sharded, "--dep", `log=${JSON.stringify(log)}`], NS),
        Worker.start("tests/services/tasks.py", redis.url, "tasks", [...sharded, "--dep", `log=${JSON.stringify(log)}`], NS),
        Worker.start("tests/services/streamer.py", redis.url, "streamer", [...sharded, "--dep", `marker=${JSON.stringify(marker)}`], NS),
        Worker.start("processes/calculator.py", redis.url, "calculator", [], NS),
      ])),
    );
    client = await connect(redis.url, { namespace: NS });
  });

  after(async () => {
    await client?.close();
    await Promise.all(workers.map((w) => w.stop()));
    plain?.disconnect();
    await redis?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("spreads its calls over every shard, each answered once", async () => {
    const tasks = client.service<Tasks>("tasks");
    // The first calls go to the first shard, until the client has read the count (in the background).
    let warm = 0;
    await waitFor("a call on a shard other than the first", async () => {
      assert.equal(await tasks.add(warm++, 0, "-"), warm - 1);
      return (await added("tasks#1")) + (await added("tasks#2")) > 0;
    }, 10_000);
    const before = await perShard("tasks");
    // 30 waves of 10 concurrent calls: the calls of one turn of the event loop go to one shard, the
    // next wave's to the next shard.
    const results: number[] = [];
    for (let wave = 0; wave < 30; wave++) {
      const batch = Array.from({ length: 10 }, (_, j) => wave * 10 + j);
      results.push(...(await Promise.all(batch.map((i) => tasks.add(i, 1, `t${i}`)))));
    }
    assert.deepEqual(results, Array.from({ length: 300 }, (_, i) => i + 1));
    const now = await perShard("tasks");
    const spread = now.map((n, k) => n - before[k]!);
    assert.equal(spread.reduce((a, b) => a + b, 0), 300, `entries added per shard: ${spread.join(", ")}`);
    for (const n of spread) assert.ok(n >= 90, `round-robin gives each shard about 100 calls: ${spread.join(", ")}`);
    const runs = readFileSync(log, "utf8").split("\n").map((l) => l.split(" ")).filter((w) => w[0] === "add" && w[1] !== "-" && w[1] !== undefined);
    assert.deepEqual(runs.map((w) => w[1]).sort(), Array.from({ length: 300 }, (_, i) => `t${i}`).sort(), "a call ran twice, or not at all");
    // Every reply came back on the reply stream of its own shard (one per shard for this client).
    for (const scope of shardScopes("tasks", K)) {
      assert.equal(await plain.exists(`${NS}:{${scope}}:reply:${client.clientId}:alive`), 1, scope);
    }
  });

  it("keeps the shard count it knew when it cannot read it again", async () => {
    const other = await connect(`redis://127.0.0.1:${redis.port}`, { namespace: NS });
    try {
      const tasks = other.service<Tasks>("tasks");
      let n = 0;
      await waitFor("the second client to send to a shard other than the first", async () => {
        const before = (await added("tasks#1")) + (await added("tasks#2"));
        await tasks.add(n++, 0);
        return (await added("tasks#1")) + (await added("tasks#2")) > before;
      }, 10_000);
      // Its next read of the count comes 5 s after the last: let it come while Redis answers
      // nothing for longer than a read may take (1 s), so that it fails.
      await new Promise((resolve) => setTimeout(resolve, 5_200));
      await plain.call("CLIENT", "PAUSE", "1500", "ALL");
      const during = n++;
      assert.equal(await tasks.add(during, 0), during); // sent to the paused Redis: answered after it
      const before = await perShard("tasks");
      for (let i = 0; i < K; i++) assert.equal(await tasks.add(i, 1), i + 1);
      const now = await perShard("tasks");
      assert.deepEqual(now.map((v, k) => v - before[k]!), [1, 1, 1], "the calls after a failed read stopped spreading");
    } finally {
      await other.close();
    }
  });

  it("keeps calls with a key, delayed jobs and jobs on the first shard", async () => {
    const tasks = client.service<Tasks>("tasks");
    const before = await perShard("tasks");
    for (let i = 0; i < K; i++) {
      assert.equal(await client.call("tasks", "add", [i, 2], {}, { key: `user-${i}` }), i + 2);
      const job = await client.submit(tasks, "add", [i, 3]);
      assert.equal(await job.result({ timeout: 10 }), i + 3);
      const later = await client.submit(tasks, "add", [i, 4], { delay: 0.05 });
      assert.equal(await later.result({ timeout: 10 }), i + 4);
    }
    const now = await perShard("tasks");
    assert.deepEqual(now.slice(1), before.slice(1), "a call with a key or a job went to another shard than the first");
  });

  it("streams on every shard, and stops a stream left early whatever its shard", async () => {
    const streamer = client.service<Streamer>("streamer");
    await waitFor("the client to send a stream to a shard other than the first", async () => {
      for await (const _ of streamer.numbers(1)) void _;
      return (await added("streamer#1")) + (await added("streamer#2")) > 0;
    }, 10_000);
    const before = await perShard("streamer");
    for (let i = 0; i < K; i++) {
      const seen: number[] = [];
      for await (const n of streamer.numbers(100)) seen.push(n); // past one credit window
      assert.deepEqual(seen, Array.from({ length: 100 }, (_, j) => j));
    }
    for (let i = 0; i < K; i++) {
      rmSync(marker, { force: true });
      let count = 0;
      for await (const _ of streamer.ticks()) if (++count === 3) break;
      // The stop goes to the control key in the call's shard, which its worker watches.
      await waitFor("the worker to stop the stream left early", () => existsSync(marker), 10_000);
    }
    const now = await perShard("streamer");
    const spread = now.map((n, k) => n - before[k]!);
    assert.deepEqual(spread, [2, 2, 2], `streams per shard: ${spread.join(", ")}`);
  });

  it("leaves an unsharded service as it was", async () => {
    const calc = client.service<{ add(a: number, b: number): Promise<number> }>("calculator");
    for (let i = 0; i < 10; i++) assert.equal(await calc.add(i, 1), i + 1);
    assert.equal(await added("calculator"), 10);
    assert.deepEqual(await plain.keys(`${NS}:{calculator#*`), []);
    assert.equal(await plain.exists(`${NS}:{calculator}:reply:${client.clientId}:alive`), 1);
  });
});
