/**
 * The URLs the Python side takes, from Node: `redis+sentinel://` (a primary and a replica that one
 * Redis Sentinel watches, a failover in the middle) and `rediss://` (a TLS-only Redis whose
 * certificate a private CA signed, trusted with `?ssl_ca_certs=`). Both set-ups come from the Python
 * test helpers (test/local_servers.py); the workers are `titan-worker` processes given the same URL.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { type Client, ConfigError, RedisUnavailable, RemoteError, connect } from "titan-broker";

import { PythonServers, Worker } from "./helpers.js";

interface Calculator {
  add(a: number, b: number): Promise<number>;
  divide(a: number, b: number): Promise<number>;
}

/** `connect(url)` must fail, within `ms`, with `type` and a message matching `text`. */
async function refused(url: string, type: new (...args: never[]) => Error, text: RegExp, ms = 15_000): Promise<void> {
  const started = performance.now();
  await assert.rejects(connect(url), (e: unknown) => {
    assert.ok(e instanceof type, `expected ${type.name}, got ${String(e)}`);
    assert.match(e.message, text);
    return true;
  });
  assert.ok(performance.now() - started < ms, `connect(${url}) took ${Math.round(performance.now() - started)} ms to fail`);
}

describe("redis+sentinel:// URLs", () => {
  let servers: PythonServers;
  let worker: Worker;
  let client: Client;

  before(async () => {
    servers = await PythonServers.start("sentinel");
    worker = await Worker.start("processes/calculator.py", servers.url, "calculator");
    client = await connect(servers.url);
  });

  after(async () => {
    await client?.close();
    await worker?.stop();
    await servers?.stop();
  });

  it("reaches the primary the sentinel names", () => {
    assert.match(servers.url, /^redis\+sentinel:\/\//);
    assert.equal(client.topology.kind, "sentinel");
  });

  it("returns results and remote errors", async () => {
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.add(5, 3), 8);
    await assert.rejects(calc.divide(1, 0), (e: unknown) => e instanceof RemoteError && e.type === "ValueError");
  });

  it("runs a job", async () => {
    const calc = client.service<Calculator>("calculator");
    const job = await client.submit(calc, "add", [2, 2], { delay: 0.2 });
    assert.equal(await client.job(job.id).result({ timeout: 10 }), 4);
  });

  it("goes on after a failover: calls reach the new primary", async () => {
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.add(1, 1), 2);
    const { old, new: promoted } = await servers.ask("failover");
    assert.notEqual(old, promoted);
    // The client and the worker each find the new primary through the sentinel by themselves.
    const after = client.service<Calculator>("calculator", { timeout: 30 });
    assert.equal(await after.add(20, 22), 42);
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => after.add(i, 1)));
    assert.deepEqual(results, Array.from({ length: 50 }, (_, i) => i + 1));
    const job = await client.submit(calc, "add", [3, 4]);
    assert.equal(await client.job(job.id).result({ timeout: 20 }), 7);
  });

  it("names the problem when the sentinel does not know the primary", async () => {
    await refused(servers.url.replace(/\/titan$/, "/nosuchprimary"), RedisUnavailable, /redis\+sentinel:\/\/.*nosuchprimary/);
  });
});

describe("rediss:// URLs", () => {
  let servers: PythonServers;
  let worker: Worker;
  let client: Client;

  before(async () => {
    servers = await PythonServers.start("tls");
    worker = await Worker.start("processes/calculator.py", servers.url, "calculator");
    client = await connect(servers.url);
  });

  after(async () => {
    await client?.close();
    await worker?.stop();
    await servers?.stop();
  });

  it("calls over TLS, trusting the CA named by ssl_ca_certs", async () => {
    assert.match(servers.url, /^rediss:\/\/.*\?ssl_ca_certs=/);
    assert.equal(client.topology.kind, "single");
    const calc = client.service<Calculator>("calculator");
    assert.equal(await calc.add(5, 3), 8);
    await assert.rejects(calc.divide(1, 0), (e: unknown) => e instanceof RemoteError && e.type === "ValueError");
  });

  it("refuses the server's certificate without its CA, and says so", async () => {
    await refused(String(servers.info["bare"]), RedisUnavailable, /rediss:\/\/127\.0\.0\.1.* TLS certificate .*not trust.*ssl_ca_certs=/);
  });

  it("refuses the server's certificate with another CA, and says so", async () => {
    const wrong = `${String(servers.info["bare"])}?ssl_ca_certs=${encodeURIComponent(String(servers.info["wrong_ca"]))}`;
    await refused(wrong, RedisUnavailable, /TLS certificate .*not trust: self-signed certificate/);
  });

  it("names a CA file it cannot read", async () => {
    const missing = `${String(servers.info["bare"])}?ssl_ca_certs=/nonexistent/ca.pem`;
    await refused(missing, ConfigError, /ssl_ca_certs.*\/nonexistent\/ca\.pem/);
  });

  it("refuses TLS options on a URL without TLS, naming them and the scheme to use", async () => {
    const plain = `${String(servers.info["bare"]).replace(/^rediss:/, "redis:")}?ssl_ca_certs=/tmp/ca.pem`;
    await refused(plain, ConfigError, /TLS options \(ssl_ca_certs\) but redis:\/\/ does not use TLS: use rediss:\/\//);
  });

  it("says a plain redis:// URL reached a TLS-only port, within bounds", async () => {
    const plain = String(servers.info["bare"]).replace(/^rediss:/, "redis:");
    await refused(plain, RedisUnavailable, /redis:\/\/127\.0\.0\.1/);
  });
});
