/**
 * The Node client against one private Redis and real Python workers (processes/*.py and the test
 * services of tests/services): results, errors, timeouts, a stalled Redis, values both ways,
 * streams, jobs, affinity, backlog, and Redis losing its data.
 */
import assert from "node:assert/strict";
import { readFileSync, existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  BacklogFull,
  BadArguments,
  CallLost,
  CallTimeout,
  Client,
  MethodNotFound,
  NoLiveWorkers,
  RedisUnavailable,
  RemoteError,
  connect,
  kw,
  pack,
  rendezvous,
} from "titan-broker";

import { PACKAGE, PYTHON, PrivateRedis, Worker, freePort, run, sleep, waitFor } from "./helpers.js";
import { png } from "./png.js";

interface User {
  id: number;
  name: string;
  email: string;
  created_at: Date;
}

interface Calculator {
  add(a: number, b: number): Promise<number>;
  divide(a: number, b: number): Promise<number>;
  factorial(n: number | bigint): Promise<number | bigint>;
}

interface Database {
  create_user(name: string, email: string): Promise<User>;
  get_user(user_id: number): Promise<User>;
  users_since(since: Date | string): AsyncIterable<User>;
}

const redis = await PrivateRedis.start();
const marker = join(mkdtempSync(join(tmpdir(), "titan-node-")), "stopped");
const workers: Worker[] = [];
let client: Client;

describe("calls from Node to Python workers", () => {
  before(async () => {
    const started = await Promise.all([
      Worker.start("processes/calculator.py", redis.url, "calculator"),
      Worker.start("processes/database.py", redis.url, "database"),
      Worker.start("processes/image_processor.py", redis.url, "image-processor"),
      Worker.start("tests/services/typed.py", redis.url, "typed"),
      Worker.start("tests/services/streamer.py", redis.url, "streamer", ["--dep", `marker=${JSON.stringify(marker)}`]),
      Worker.start("tests/services/slow.py", redis.url, "slow"),
      Worker.start("tests/services/slow.py", redis.url, "slow"),
      Worker.start("tests/services/small_backlog.py", redis.url, "small-backlog", ["--concurrency", "1"]),
    ]);
    workers.push(...started);
    client = await connect(redis.url, { namespace: "titan" });
  });

  after(async () => {
    await client?.close();
    await Promise.all(workers.map((w) => w.stop()));
    await redis.stop();
  });

  it("returns results", async () => {
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.add(5, 3), 8);
    assert.equal(await calc.add(0.5, 0.25), 0.75);
    assert.equal(await calc.factorial(5), 120);
  });

  it("raises the worker's errors as RemoteError with type, message, details and errorId", async () => {
    const calc = client.service<Calculator>("calculator");
    const error = await calc.divide(1, 0).then(() => null, (e: unknown) => e);
    assert.ok(error instanceof RemoteError);
    assert.equal(error.type, "ValueError");
    assert.equal(error.message, "Division by zero");
    assert.match(error.errorId ?? "", /^[0-9a-f]{6,}$/);
    assert.equal(error.details["error_id"], error.errorId);
    const missing = await client.service<{ nope(): Promise<void> }>("calculator").nope().then(() => null, (e: unknown) => e);
    assert.ok(missing instanceof MethodNotFound);
    assert.equal(missing.type, "titan.MethodNotFound");
  });

  it("gets BadArguments naming the parameter for a wrong type sent from Node", async () => {
    const calc = client.service<{ add(a: unknown, b: unknown): Promise<number> }>("calculator");
    const error = await calc.add("five", 3).then(() => null, (e: unknown) => e);
    assert.ok(error instanceof BadArguments, String(error));
    assert.match(error.message, /argument 'a' must be float, got str/);
    const db = client.service<{ get_user(id: unknown): Promise<User> }>("database");
    const wrong = await db.get_user({ id: 7 }).then(() => null, (e: unknown) => e);
    assert.ok(wrong instanceof BadArguments);
    assert.match(wrong.message, /user_id/);
  });

  it("times out at the deadline with CallTimeout, and NoLiveWorkers when nobody serves", async () => {
    const slow = client.service<{ sleep(s: number): Promise<unknown> }>("slow", { timeout: 0.5 });
    const started = performance.now();
    await assert.rejects(slow.sleep(3), (e: unknown) => e instanceof CallTimeout && !(e instanceof NoLiveWorkers));
    const took = performance.now() - started;
    assert.ok(took >= 480 && took < 1500, `took ${took} ms`);
    const ghost = client.service<{ anything(): Promise<void> }>("ghost", { timeout: 0.4 });
    await assert.rejects(ghost.anything(), NoLiveWorkers);
    const quick = client.service<{ anything(): Promise<void> }>("ghost", { timeout: 5, waitForWorker: false });
    const t0 = performance.now();
    await assert.rejects(quick.anything(), (e: unknown) => e instanceof NoLiveWorkers && /was not sent/.test(e.message));
    assert.ok(performance.now() - t0 < 1000);
  });

  it("withdraws a request its caller gave up on before a worker took it", async () => {
    const ghost = client.service<{ later(): Promise<void> }>("ghost2", { timeout: 0.3 });
    await assert.rejects(ghost.later(), CallTimeout);
    const r = redis.client();
    try {
      await waitFor("the request to be deleted", async () => (await r.xlen("titan:{ghost2}:calls")) === 0, 5000);
      const gone = await r.keys("titan:{ghost2}:gone:*");
      assert.equal(gone.length, 1);
    } finally {
      r.disconnect();
    }
  });

  it("ends at the deadline while Redis is stopped (SIGSTOP), and works again after", async () => {
    const calc = client.service<Calculator>("calculator", { timeout: 1 });
    assert.equal(await calc.add(1, 1), 2);
    redis.pause();
    const started = performance.now();
    try {
      await assert.rejects(calc.add(2, 2), (e: unknown) => e instanceof CallTimeout && /did not answer|no answer/.test(e.message));
    } finally {
      redis.resume();
    }
    const took = performance.now() - started;
    assert.ok(took >= 950 && took < 2000, `took ${took} ms`);
    assert.equal(await client.service<Calculator>("calculator", { timeout: 10 }).add(2, 2), 4);
    const r = redis.client();
    try {
      assert.equal(await r.xlen("titan:{calculator}:calls"), 0); // the late request was refused, not queued
    } finally {
      r.disconnect();
    }
  });

  it("carries integers beyond 2^53 as bigint both ways", async () => {
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.factorial(25), 15511210043330985984000000n);
    assert.equal(await calc.factorial(20), 2432902008176640000n); // 64 bits, beyond 2^53
    assert.equal(await calc.factorial(10n), 3628800); // a bigint argument
    const slow = client.service<{ echo(v: unknown): Promise<unknown> }>("slow");
    for (const v of [2n ** 53n + 1n, -(2n ** 63n), 2n ** 64n - 1n, 2n ** 64n, -(2n ** 200n) + 7n, 2 ** 53 - 1]) {
      assert.equal(await slow.echo(v), v);
    }
  });

  it("carries datetimes, bytes, the string forms and a dataclass both ways", async () => {
    const typed = client.service<{
      shift(when: Date, by: string): Promise<Date>;
      echo(value: Record<string, unknown>): Promise<Record<string, unknown>>;
      seen(value: Record<string, unknown>): Promise<Record<string, string>>;
      either(value: string | Date): Promise<string | Date>;
    }>("typed");
    const when = new Date("2024-05-01T10:30:15.123Z");
    const shifted = await typed.shift(when, "PT90S");
    assert.ok(shifted instanceof Date);
    assert.equal(shifted.toISOString(), "2024-05-01T10:31:45.123Z");
    const everything = {
      naive: "2024-05-01T12:30:15.123456",
      aware: when,
      day: "2024-05-01",
      clock: "23:59:58.005000",
      span: "P2DT3.0005S",
      ident: "12345678-1234-5678-1234-567812345678",
      amount: "12.50",
      color: "red",
      level: 2,
      mode: "fast",
      blob: new Uint8Array([0, 1, 254, 255]),
      tags: new Set(["a"]),
      frozen: [1, 2],
      pair: [1, "x"],
      named: [2, "y"],
      row: { name: "r", score: "1.5" },
      kind: "a",
      maybe: null,
      points: [{ x: 1, y: 2 }],
      by_day: { k: [["2024-05-01", "3.25"]] },
      huge: 2n ** 70n,
    };
    const seen = await typed.seen(everything);
    assert.deepEqual(
      { naive: seen["naive"], aware: seen["aware"], day: seen["day"], clock: seen["clock"], span: seen["span"], ident: seen["ident"], amount: seen["amount"], color: seen["color"], blob: seen["blob"], tags: seen["tags"], huge: seen["huge"], points: seen["points[0]"], byDay: seen["by_day[][0]"] },
      { naive: "datetime", aware: "datetime", day: "date", clock: "time", span: "timedelta", ident: "UUID", amount: "Decimal", color: "Color", blob: "bytes", tags: "set", huge: "int", points: "Point", byDay: "date,Decimal" },
    );
    const back = await typed.echo(everything);
    assert.ok(back["aware"] instanceof Date);
    assert.equal((back["aware"] as Date).getTime(), when.getTime());
    assert.equal(back["naive"], "2024-05-01T12:30:15.123456");
    assert.equal(back["day"], "2024-05-01");
    assert.equal(back["span"], "P2DT3.0005S");
    assert.equal(back["ident"], everything.ident);
    assert.equal(back["amount"], "12.50");
    assert.deepEqual(back["blob"], new Uint8Array([0, 1, 254, 255]));
    assert.deepEqual(back["tags"], ["a"]);
    assert.equal(back["huge"], 2n ** 70n);
    assert.deepEqual(back["points"], [{ x: 1, y: 2 }]);
    assert.deepEqual(back["by_day"], { k: [["2024-05-01", "3.25"]] });
    assert.ok((await typed.either(when)) instanceof Date);
    assert.equal(await typed.either("text"), "text");
  });

  it("gets dataclasses with datetimes from the database, and streams with a Date argument", async () => {
    const db = client.service<Database>("database");
    const before = new Date(Date.now() - 1000);
    const ann = await db.create_user("Ann", "ann@example.com");
    assert.equal(ann.name, "Ann");
    assert.ok(ann.created_at instanceof Date);
    assert.ok(Math.abs(ann.created_at.getTime() - Date.now()) < 10_000);
    assert.deepEqual(await db.get_user(ann.id), ann);
    await db.create_user("Bob", "bob@example.com");
    const names: string[] = [];
    for await (const user of db.users_since(before)) names.push(user.name);
    assert.deepEqual(names, ["Ann", "Bob"]);
    const db2 = client.service<{ get_all_users(k: unknown): Promise<User[]> }>("database");
    assert.equal((await db2.get_all_users(kw({ limit: 1 }))).length, 1);
  });

  it("streams a batch of images, and more items than the credit window in order", async () => {
    const images = client.service<{ process_batch(jobs: unknown[]): AsyncIterable<Record<string, unknown>> }>("image-processor", { timeout: 60 });
    const jobs = Array.from({ length: 6 }, (_, i) => ({ id: i, image: png(32, 24, i + 1), operations: [{ op: "resize", width: 8, height: 6 }, { op: "filter", name: "grayscale" }] }));
    jobs.push({ id: 99, image: new Uint8Array([1, 2, 3]), operations: [] });
    const results: Array<Record<string, unknown>> = [];
    for await (const r of images.process_batch(jobs)) results.push(r);
    assert.equal(results.length, 7);
    const good = results.filter((r) => r["error"] === undefined);
    assert.equal(good.length, 6);
    for (const r of good) {
      assert.equal(r["width"], 8);
      assert.ok(r["image"] instanceof Uint8Array);
    }
    assert.match(String(results.find((r) => r["id"] === 99)?.["error"]), /not an image/);
    const streamer = client.service<{ numbers(n: number): AsyncIterable<number> }>("streamer");
    const seen: number[] = [];
    for await (const n of streamer.numbers(200)) seen.push(n);
    assert.deepEqual(seen, Array.from({ length: 200 }, (_, i) => i));
  });

  it("stops the worker's producer when the caller leaves a stream early", async () => {
    const streamer = client.service<{ ticks(): AsyncIterable<number>; then_fail(): AsyncIterable<number> }>("streamer");
    let count = 0;
    for await (const tick of streamer.ticks()) {
      assert.equal(tick, count);
      if (++count === 5) break;
    }
    await waitFor("the producer to stop", () => existsSync(marker) && /stopped after/.test(readFileSync(marker, "utf8")), 10_000);
    const items: number[] = [];
    await assert.rejects(async () => {
      for await (const n of streamer.then_fail()) items.push(n);
    }, (e: unknown) => e instanceof RemoteError && e.type === "ValueError" && e.details["items"] === 2);
    assert.deepEqual(items, [1, 2]);
  });

  it("fails a stream with CallLost when items were lost, whether more items or the end came next", async () => {
    const streamer = client.service<{ ticks(): AsyncIterable<number> }>("streamer");
    const r = redis.client();
    try {
      // What a failover that lost writes to the reply stream leaves: a message from further on.
      for (const [next, gap] of [[{ s: 500, i: [500] }, /items \d+ to 499: item 500 came next/], [{ end: 500 }, /items \d+ to 499: its end came next/]] as const) {
        const seen: number[] = [];
        await assert.rejects(async () => {
          for await (const tick of streamer.ticks()) {
            seen.push(tick);
            if (seen.length > 1) continue;
            const fields = ((await r.xrange("titan:{streamer}:calls", "-", "+")) as Array<[string, string[]]>)[0]![1];
            const field = (name: string) => String(fields[fields.indexOf(name) + 1]);
            await r.xadd(field("r"), "*", "reply", Buffer.from(pack({ id: field("id"), ok: true, ...next, w: "elsewhere" })));
          }
        }, (e: unknown) => e instanceof CallLost && gap.test(e.message));
        assert.deepEqual(seen, seen.map((_, i) => i));
        await waitFor("the abandoned stream's request to go", async () => (await r.xlen("titan:{streamer}:calls")) === 0, 10_000);
      }
    } finally {
      r.disconnect();
    }
  });

  it("runs a background job, read back by its id from a second Node process", async () => {
    const calc = client.service<Calculator>("calculator");
    const job = await client.submit(calc, "add", [5, 3], { delay: 1 });
    assert.match(job.id, /^calculator:[0-9a-f]{32}$/);
    const status = await job.status();
    assert.equal(status.state, "queued");
    assert.ok(status.due !== null && status.submitted !== null && status.due.getTime() - status.submitted.getTime() >= 1000);
    const other = await run(process.execPath, [join(PACKAGE, "test-dist", "test", "read_job.js"), redis.url, job.id], { timeoutMs: 30_000 });
    assert.equal(other.code, 0, other.out);
    assert.deepEqual(JSON.parse(other.out.trim().split("\n").pop()!), { state: "done", result: 8 });
    assert.equal(await job.result({ timeout: 10 }), 8);
    assert.equal((await job.status()).state, "done");
    const failing = await client.submit(calc, "divide", [1, 0]);
    await assert.rejects(failing.result({ timeout: 10 }), (e: unknown) => e instanceof RemoteError && e.type === "ValueError");
    assert.equal((await failing.status()).error?.message, "Division by zero");
    const ghost = await client.submit("ghost3", "x", [], { delay: 60 });
    assert.equal(await ghost.cancel(), true);
    assert.equal((await ghost.status()).state, "cancelled");
  });

  it("makes 1,000 concurrent calls", async () => {
    const calc = client.service<Calculator>("calculator");
    const results = await Promise.all(Array.from({ length: 1000 }, (_, i) => calc.add(i, 0.5)));
    assert.deepEqual(results, Array.from({ length: 1000 }, (_, i) => i + 0.5));
  });

  it("refuses calls past the service's backlog with BacklogFull", async () => {
    const svc = client.service<{ wait(s: number): Promise<number> }>("small-backlog", { timeout: 20 });
    const outcomes = await Promise.allSettled(Array.from({ length: 12 }, () => svc.wait(0.2)));
    const refused = outcomes.filter((o) => o.status === "rejected");
    assert.ok(refused.length > 0, "some calls are refused");
    for (const o of refused) assert.ok((o as PromiseRejectedResult).reason instanceof BacklogFull, String((o as PromiseRejectedResult).reason));
    assert.ok(outcomes.some((o) => o.status === "fulfilled"));
  });

  it("routes an affinity key to one worker, the one Python's rendezvous hashing picks", async () => {
    const r = redis.client();
    let byPid: Map<string, string>;
    let ids: string[];
    try {
      ids = (await r.smembers("titan:{slow}:affinity")).sort();
      byPid = new Map(await Promise.all(ids.map(async (id) => [id, (await r.hget(`titan:{slow}:worker:${id}`, "pid")) ?? ""] as [string, string])));
    } finally {
      r.disconnect();
    }
    assert.equal(ids.length, 2);
    for (const key of ["user-1", "user-2", "user-3", "user-4"]) {
      const pids = new Set<number>();
      for (let i = 0; i < 5; i++) pids.add(((await client.call("slow", "sleep", [0, i], {}, { key })) as { pid: number }).pid);
      assert.equal(pids.size, 1);
      assert.equal(String([...pids][0]), byPid.get(rendezvous(key, ids)!));
    }
    const script = "import hashlib,sys\nfor a in sys.argv[1:]:\n  k,w=a.split('|');print(hashlib.blake2b(f'{k}\\x00{w}'.encode(),digest_size=8).hexdigest())";
    const names = ["a|w1", "user-1|0123456789abcdef", "ключ|ü" , "x".repeat(300) + "|y"];
    const py = await run(PYTHON, ["-c", script, ...names]);
    const { blake2b } = await import("../src/blake2b.js");
    const mine = names.map((n) => {
      const [k, w] = n.split("|");
      return Buffer.from(blake2b(Buffer.from(`${k}\0${w}`), 8)).toString("hex");
    });
    assert.deepEqual(mine, py.out.trim().split("\n"));
    assert.equal(rendezvous("k", []), null);
  });

  it("connects with an ACL user and password, and says clearly when it cannot", async () => {
    const r = redis.client();
    try {
      await r.call("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "&*", "+@all");
    } finally {
      r.disconnect();
    }
    const port = redis.port;
    const alice = await connect(`redis://alice:s3cret@127.0.0.1:${port}`);
    try {
      assert.equal(await alice.service<Calculator>("calculator").add(1, 2), 3);
    } finally {
      await alice.close();
    }
    await assert.rejects(connect(`redis://alice:wrong@127.0.0.1:${port}`), (e: unknown) => e instanceof RedisUnavailable && /refused the credentials/.test(e.message) && !e.message.includes("wrong"));
    const nobody = await freePort();
    await assert.rejects(connect(`redis://127.0.0.1:${nobody}`), (e: unknown) => e instanceof RedisUnavailable && e.message.includes(`cannot reach Redis at redis://127.0.0.1:${nobody}`));
  });
});

describe("Redis losing its data", () => {
  it("fails a waiting call with CallLost when Redis restarts without its data", async () => {
    const lost = await PrivateRedis.start();
    const c = await connect(lost.url);
    try {
      const ghost = c.service<{ wait(): Promise<void> }>("nobody-home", { timeout: 30 });
      const outcome = ghost.wait().then(() => null, (e: unknown) => e);
      await sleep(300);
      const started = performance.now();
      await lost.restart();
      const error = await outcome;
      assert.ok(error instanceof CallLost, String(error));
      assert.ok(performance.now() - started < 8000);
    } finally {
      await c.close();
      await lost.stop();
    }
  });
});
