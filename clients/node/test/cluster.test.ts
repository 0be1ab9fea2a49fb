/**
 * The same calls on a private Redis Cluster (started by the Python helpers), reached through one
 * node's URL: the client detects the cluster and sends each service's keys to the node of its slot.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { BadArguments, CallTimeout, type Client, RemoteError, connect } from "titan-broker";

import { PythonCluster, Worker } from "./helpers.js";

interface Calculator {
  add(a: number, b: number): Promise<number>;
  divide(a: number, b: number): Promise<number>;
  factorial(n: number): Promise<number | bigint>;
}

describe("calls on a Redis Cluster", () => {
  let cluster: PythonCluster;
  const workers: Worker[] = [];
  let client: Client;

  before(async () => {
    cluster = await PythonCluster.start();
    workers.push(
      ...(await Promise.all([
        Worker.start("processes/calculator.py", cluster.url, "calculator"),
        Worker.start("tests/services/streamer.py", cluster.url, "streamer"),
        Worker.start("tests/services/typed.py", cluster.url, "typed"),
      ])),
    );
    client = await connect(cluster.url);
  });

  after(async () => {
    await client?.close();
    await Promise.all(workers.map((w) => w.stop()));
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
});
