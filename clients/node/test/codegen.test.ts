/**
 * `titan codegen typescript` against the registry of real workers, then tsc on a caller: the
 * declarations check a right call and refuse an argument of the wrong type.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { PACKAGE, PrivateRedis, TITAN, Worker, run } from "./helpers.js";

const TSC = join(PACKAGE, "node_modules", "typescript", "bin", "tsc");

const GOOD = `
import { connect, kw } from "titan-broker";
import type { Calculator, Database, ImageProcessor, Typed, User } from "./services.js";

export async function main(): Promise<void> {
  const client = await connect(process.env["TITAN_REDIS_URL"]);
  const calc = client.service<Calculator>("calculator");
  const sum: number = await calc.add(5, 3);
  const big: number | bigint = await calc.factorial(30n);
  const db = client.service<Database>("database", { timeout: 2 });
  const user: User = await db.create_user("Ann", "ann@example.com");
  const when: Date = user.created_at;
  for await (const u of db.users_since(new Date())) console.log(u.email);
  const some: User[] = await db.get_all_users(10);
  const images = client.service<ImageProcessor>("image-processor");
  for await (const r of images.process_batch([{ image: new Uint8Array([1]) }])) console.log(r);
  const typed = client.service<Typed>("typed");
  const names: string[] = await typed.top(new Date(), "uuid", "1.5", "red", ["a"], [1, "x"], { x: 1, y: 2 }, kw({ maybe: null }));
  const job = await client.submit(calc, "add", [1, 2], { delay: 1 });
  const result: number = await job.result({ timeout: 5 });
  console.log(sum, big, when, some, names, result);
  await client.close();
}
`;

const BAD = GOOD.replace("await calc.add(5, 3)", 'await calc.add("5", 3)');

describe("titan codegen typescript", () => {
  let redis: PrivateRedis;
  const workers: Worker[] = [];
  const dir = mkdtempSync(join(tmpdir(), "titan-codegen-"));

  before(async () => {
    redis = await PrivateRedis.start();
    workers.push(
      ...(await Promise.all([
        Worker.start("processes/calculator.py", redis.url, "calculator"),
        Worker.start("processes/database.py", redis.url, "database"),
        Worker.start("processes/image_processor.py", redis.url, "image-processor"),
        Worker.start("tests/services/typed.py", redis.url, "typed"),
      ])),
    );
    writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({
      compilerOptions: {
        target: "ES2022", module: "NodeNext", moduleResolution: "NodeNext", strict: true, noEmit: true,
        skipLibCheck: true, types: ["node"], typeRoots: [join(PACKAGE, "node_modules", "@types")],
        baseUrl: ".", paths: { "titan-broker": [join(PACKAGE, "dist", "index.d.ts")] },
      },
      files: ["services.ts", "caller.ts"],
    }));
    writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
  });

  after(async () => {
    await Promise.all(workers.map((w) => w.stop()));
    await redis?.stop();
  });

  it("writes declarations that tsc accepts for a right caller and refuses for a wrong argument type", async () => {
    const out = join(dir, "services.ts");
    const gen = await run(TITAN, ["--redis", redis.url, "codegen", "typescript", "-o", out]);
    assert.equal(gen.code, 0, gen.out);
    const text = readFileSync(out, "utf8");
    assert.match(text, /export interface Calculator \{/);
    assert.match(text, /process_batch\(jobs: Array<Record<string, unknown>>\): AsyncIterable<Record<string, unknown>>;/);

    writeFileSync(join(dir, "caller.ts"), GOOD);
    const good = await run(process.execPath, [TSC, "-p", join(dir, "tsconfig.json")], { cwd: dir, timeoutMs: 120_000 });
    assert.equal(good.code, 0, good.out);

    writeFileSync(join(dir, "caller.ts"), BAD);
    const bad = await run(process.execPath, [TSC, "-p", join(dir, "tsconfig.json")], { cwd: dir, timeoutMs: 120_000 });
    assert.notEqual(bad.code, 0);
    assert.match(bad.out, /caller\.ts\(\d+,\d+\): error TS2345: Argument of type 'string' is not assignable to parameter of type 'number'/);
  });
});
