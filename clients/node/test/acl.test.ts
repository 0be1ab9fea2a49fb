/**
 * The Node client under the caller rule `titan acl caller` writes (Redis 7): it calls and submits
 * jobs with nothing refused, its client id starts with its ACL user's name, and it cannot touch
 * another service or another user's replies.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Client, RedisUnavailable, connect } from "titan-broker";

import { PrivateRedis, TITAN, Worker, run } from "./helpers.js";

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

describe("the Node client under the caller rule", () => {
  before(async () => {
    await apply("worker", "calculator", "--user", "calc-worker");
    await apply("caller", "calculator", "--user", "node-caller");
    worker = await Worker.start("processes/calculator.py", userUrl("calc-worker"), "calculator", [], NS);
    client = await connect(userUrl("node-caller"), { namespace: NS });
  });

  after(async () => {
    await client?.close();
    await worker?.stop();
    await redis.stop();
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

  it("cannot call another service nor touch another user's replies", async () => {
    await assert.rejects(
      client.service<{ get_user(id: number): Promise<unknown> }>("database", { timeout: 5 }).get_user(1),
      (e: unknown) => e instanceof RedisUnavailable && /permission/i.test(e.message),
    );
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
