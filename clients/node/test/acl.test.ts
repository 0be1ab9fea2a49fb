/**
 * The Node client under the caller rule `titan acl caller` writes (Redis 7): it calls and submits
 * jobs with nothing refused, its client id starts with its ACL user's name, and it cannot touch
 * another service or another user's replies. What Redis refuses fails with AccessDenied, naming the
 * command, the key, the ACL user and the caller rule, and is never retried.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { AccessDenied, CallTimeout, Client, RedisUnavailable, TitanError, connect } from "titan-broker";

import { PrivateRedis, TITAN, Worker, run, waitFor } from "./helpers.js";

const NS = "nodeacl";
const redis = await PrivateRedis.start();
let worker: Worker;
let client: Client;

function userUrl(user: string): string {
  return `redis://${user}:${user}-pw@127.0.0.1:${redis.port}`;
}

async function apply(...args: string[]): Promise<void> {
  const user = args[args.indexOf("--user") + 1] ?? "";
  const done = await run(TITAN, ["--redis", redis.url, "--namespace", NS, "acl", ...args, "--password-env", "ACL_TEST_PW", "--apply"], {
    env: { ...process.env, ACL_TEST_PW: `${user}-pw` },
  });
  assert.equal(done.code, 0, done.out);
}

async function refusals(): Promise<string[]> {
  const admin = redis.client();
  try {
    const log = (await admin.call("ACL", "LOG", "128")) as unknown[][];
    return log.map((entry) => {
      const row = new Map<string, unknown>();
      for (let i = 0; i < entry.length; i += 2) row.set(String(entry[i]), entry[i + 1]);
      return `${String(row.get("username"))} ${String(row.get("object"))}`;
    });
  } finally {
    admin.disconnect();
  }
}

/** An AccessDenied (so a RedisUnavailable and a TitanError) naming the key, the user and the caller rule. */
function denied(e: unknown, key: string, user: string): boolean {
  assert.ok(e instanceof AccessDenied, `not an AccessDenied: ${String(e)}`);
  assert.ok(e instanceof RedisUnavailable && e instanceof TitanError);
  assert.equal(e.name, "AccessDenied");
  assert.match(e.message, /Redis refused [A-Z]+( [a-z_]+)? on key '/);
  assert.ok(e.message.includes(`on key '${key}`), e.message);
  assert.ok(e.message.includes(`ACL user '${user}'`), e.message);
  assert.match(e.message, /needs the caller rule \(`titan acl caller \.\.\.`\)/);
  return true;
}

after(async () => {
  await client?.close();
  await redis.stop();
});

describe("the Node client under the caller rule", () => {
  before(async () => {
    await apply("worker", "calculator", "--user", "calc-worker");
    await apply("caller", "calculator", "--user", "node-caller");
    worker = await Worker.start("processes/calculator.py", userUrl("calc-worker"), "calculator", [], NS);
    client = await connect(userUrl("node-caller"), { namespace: NS });
  });

  after(async () => {
    await worker?.stop();
  });

  it("calls and submits jobs with nothing refused, as its own user", async () => {
    const admin = redis.client();
    await admin.call("ACL", "LOG", "RESET");
    admin.disconnect();
    assert.ok(client.clientId.startsWith("node-caller."), client.clientId);
    const calc = client.service<{ add(a: number, b: number): Promise<number> }>("calculator");
    assert.equal(await calc.add(2, 3), 5);
    const job = await client.submit("calculator", "multiply", [6, 7]);
    assert.equal(await job.result({ timeout: 10 }), 42);
    assert.deepEqual(await refusals(), []);
  });

  it("sends to its user's own streams, and cannot read, delete or add to another user's or the shared one", async () => {
    const calc = client.service<{ add(a: number, b: number): Promise<number> }>("calculator");
    assert.equal(await calc.add(1, 1), 2);
    assert.equal(await client.service<{ add(a: number, b: number): Promise<number> }>("calculator", { key: "k" }).add(1, 2), 3);
    const later = await client.submit("calculator", "add", [1, 2], { delay: 60 });
    assert.equal(await later.cancel(), true);
    const soon = await client.submit("calculator", "add", [2, 2], { delay: 0.1 });
    assert.equal(await soon.result({ timeout: 10 }), 4);
    const admin = redis.client();
    try {
      const mine = `${NS}:{calculator}:calls@node-caller`;
      const added = async (key: string): Promise<number> => {
        const info = (await admin.call("XINFO", "STREAM", key)) as unknown[];
        return Number(info[info.indexOf("entries-added") + 1]);
      };
      assert.ok((await added(mine)) >= 3, "its calls and its jobs (the delayed one come due) on its own stream");
      assert.equal(await added(`${NS}:{calculator}:calls`), 0, "nothing on the shared stream");
      await admin.xadd(`${NS}:{calculator}:calls@other`, "*", "v", "3");
    } finally {
      admin.disconnect();
    }
    const raw = client.redis;
    for (const stream of [`${NS}:{calculator}:calls@other`, `${NS}:{calculator}:calls`, `${NS}:{calculator}:calls:w1@other`]) {
      for (const command of [["XRANGE", stream, "-", "+"], ["XDEL", stream, "0-1"], ["XADD", stream, "*", "v", "3"]]) {
        await assert.rejects(raw.call(command[0] as string, ...command.slice(1)), /NOPERM|permission/i, command.join(" "));
      }
    }
  });

  it("cannot call another service nor touch another user's replies", async () => {
    const started = performance.now();
    await assert.rejects(
      client.service<{ get_user(id: number): Promise<unknown> }>("database", { timeout: 5 }).get_user(1),
      (e: unknown) => denied(e, `${NS}:{database}:reply:node-caller.`, "node-caller"),
    );
    assert.ok(performance.now() - started < 2000, "refused at once, not at the call's timeout");
    const raw = client.redis;
    for (const command of [
      ["XADD", `${NS}:{calculator}:reply:other.0123`, "*", "reply", "forged"],
      ["DEL", `${NS}:{calculator}:reply:other.0123`],
      ["HSET", `${NS}:{calculator}:config`, "max_backlog", "1"],
      ["XRANGE", `${NS}:{database}:calls`, "-", "+"],
    ]) {
      await assert.rejects(raw.call(command[0] as string, ...command.slice(1)), /NOPERM|permission/i, command.join(" "));
    }
  });
});

describe("the Node client refused by Redis", () => {
  const logged: string[] = [];
  let idle: Client;

  before(async () => {
    await apply("caller", "idle", "--user", "node-idle");
    idle = await connect(userUrl("node-idle"), { namespace: NS, log: (m) => logged.push(m) });
  });

  after(async () => {
    await idle?.close();
  });

  it("fails the calls waiting on a reply stream it may no longer read, at once and without retrying", async () => {
    const admin = redis.client();
    try {
      const started = performance.now();
      const waiting = idle.service<{ wait(): Promise<unknown> }>("idle", { timeout: 8 }).wait();
      const outcome = waiting.then(() => null, (e: unknown) => e);
      // The request is queued (no worker serves 'idle'): the call waits on its reply stream.
      // On its user's own stream: `titan acl caller --apply` registered the user with the service.
      await waitFor("the call's request in Redis", async () => (await admin.xlen(`${NS}:{idle}:calls@node-idle`)) === 1, 10_000);
      await admin.call("ACL", "SETUSER", "node-idle", "clearselectors");
      const error = await outcome;
      assert.ok(!(error instanceof CallTimeout), `the call timed out instead: ${String(error)}`);
      assert.ok(denied(error, `${NS}:{idle}:reply:node-idle.`, "node-idle"));
      assert.match((error as Error).message, /cannot read the replies of 'idle': Redis refused/);
      assert.ok(performance.now() - started < 6000, "failed before the call's timeout");
      assert.deepEqual(logged.filter((m) => /retrying/.test(m)), [], "a refusal is not retried");
      // The link is dropped: the next call tries again, and is refused again.
      await assert.rejects(
        idle.service<{ wait(): Promise<unknown> }>("idle", { timeout: 8 }).wait(),
        (e: unknown) => denied(e, `${NS}:{idle}:reply:node-idle.`, "node-idle"),
      );
    } finally {
      admin.disconnect();
    }
  });

  it("says which command a user may not run when it connects", async () => {
    const admin = redis.client();
    try {
      await admin.call("ACL", "SETUSER", "node-noping", "on", ">node-noping-pw", "-@all", "+info");
    } finally {
      admin.disconnect();
    }
    await assert.rejects(connect(userUrl("node-noping"), { namespace: NS }), (e: unknown) => {
      assert.ok(e instanceof AccessDenied && e instanceof RedisUnavailable, String(e));
      assert.match(e.message, /Redis refused PING for ACL user 'node-noping'/);
      assert.match(e.message, /needs the caller rule/);
      assert.ok(!e.message.includes("node-noping-pw"), "the password is hidden");
      return true;
    });
  });

  it("takes its user name from the URL when its rule refuses ACL WHOAMI", async () => {
    await apply("caller", "idle", "--user", "node-nowhoami");
    const admin = redis.client();
    try {
      await admin.call("ACL", "SETUSER", "node-nowhoami", "-acl|whoami");
    } finally {
      admin.disconnect();
    }
    const caller = await connect(userUrl("node-nowhoami"), { namespace: NS });
    try {
      // Else its reply keys would not match its rule (`<user>.*`) and every call would be refused.
      assert.ok(caller.clientId.startsWith("node-nowhoami."), caller.clientId);
      await assert.rejects(caller.service<{ wait(): Promise<unknown> }>("idle", { timeout: 0.5 }).wait(), CallTimeout);
    } finally {
      await caller.close();
    }
  });

  it("reads no job of a service it has no rule for", async () => {
    const job = client.job("database:0123abcd");
    await assert.rejects(job.status(), (e: unknown) => denied(e, `${NS}:{database}:job:0123abcd`, "node-caller") && /HGETALL/.test((e as Error).message));
    await assert.rejects(job.result({ timeout: 5 }), (e: unknown) => denied(e, `${NS}:{database}:job:0123abcd`, "node-caller") && /HMGET/.test((e as Error).message));
    await assert.rejects(job.cancel(), (e: unknown) => denied(e, `${NS}:{database}:job:0123abcd`, "node-caller"));
  });
});
