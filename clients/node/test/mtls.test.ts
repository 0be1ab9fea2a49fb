/**
 * Mutual TLS: a Redis that asks every client for a certificate its CA signed (`tls-auth-clients
 * yes`); the Node client presents its own with `?ssl_certfile=...&ssl_keyfile=...`, as the Python
 * workers do, and one without is refused.
 */
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { Client, connect } from "titan-broker";

import { PrivateRedis, Worker, freePort, run } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "titan-node-mtls-"));

async function openssl(...args: string[]): Promise<void> {
  const done = await run("openssl", args, { cwd: dir });
  assert.equal(done.code, 0, done.out);
}

async function makeCerts(): Promise<void> {
  await openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=titan-test-ca", "-keyout", "ca.key", "-out", "ca.crt");
  writeFileSync(join(dir, "san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  for (const name of ["server", "client"]) {
    await openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", `/CN=${name}`, "-keyout", `${name}.key`, "-out", `${name}.csr`);
    await openssl("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", `${name}.crt`);
  }
}

await makeCerts();
const tlsPort = await freePort();
const redis = await PrivateRedis.start([
  "--tls-port", String(tlsPort), "--tls-cert-file", join(dir, "server.crt"), "--tls-key-file", join(dir, "server.key"),
  "--tls-ca-cert-file", join(dir, "ca.crt"), "--tls-auth-clients", "yes",
]);

function url(withCertificate: boolean): string {
  let query = `ssl_ca_certs=${join(dir, "ca.crt")}`;
  if (withCertificate) query += `&ssl_certfile=${join(dir, "client.crt")}&ssl_keyfile=${join(dir, "client.key")}`;
  return `rediss://127.0.0.1:${tlsPort}/0?${query}`;
}

let worker: Worker;
let client: Client;

describe("mutual TLS", () => {
  before(async () => {
    worker = await Worker.start("processes/calculator.py", url(true), "calculator", [], "nodemtls");
    client = await connect(url(true), { namespace: "nodemtls" });
  });

  after(async () => {
    await client?.close();
    await worker?.stop();
    await redis.stop();
  });

  it("calls a Python worker, both presenting a client certificate", async () => {
    assert.equal(await client.service<{ add(a: number, b: number): Promise<number> }>("calculator").add(2, 3), 5);
  });

  it("is refused without a client certificate", async () => {
    await assert.rejects(connect(url(false), { namespace: "nodemtls" }));
  });
});
