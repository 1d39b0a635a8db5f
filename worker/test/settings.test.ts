import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { Env } from "../src/config";
import { BASE, bytes, countingBucket, newBase, newKey, send } from "./helpers";

// wrangler passes a var written in wrangler.jsonc as JSON other than a string (10000, false,
// null) to the Worker as that value. These settings reach the Worker through its entry point as
// a deployment would give them.

afterEach(() => {
  vi.restoreAllMocks();
});

/** An image stored in the local R2 bucket, and its URL. */
async function stored(): Promise<string> {
  const key = newKey();
  await env.IMAGES.put(key, bytes(10));
  return `${BASE}/${key}`;
}

/** What console.error was given, joined. */
function captureErrors(): string[] {
  const logged: string[] = [];
  vi.spyOn(console, "error").mockImplementation((...args: unknown[]) => {
    logged.push(args.join(" "));
  });
  return logged;
}

/** ORIGIN_TIMEOUT_MS at `value` answers 500 and logs its name; what was logged. */
async function expectTimeoutRefused(value: unknown): Promise<string[]> {
  const logged = captureErrors();
  const res = await send(await stored(), { ORIGIN_TIMEOUT_MS: value } as Partial<Env>);
  expect(res.status).toBe(500);
  expect(await res.text()).toBe("Server Misconfigured\n");
  expect(logged).toEqual([expect.stringContaining("ORIGIN_TIMEOUT_MS")]);
  return logged;
}

const SECRET = "0123456789abcdef0123456789abcdef";

describe("settings given as JSON numbers and booleans", () => {
  it("takes a number for ORIGIN_TIMEOUT_MS", async () => {
    const logged = captureErrors();
    expect((await send(await stored(), { ORIGIN_TIMEOUT_MS: 10000 })).status).toBe(200);
    // The number is the timeout, not ignored: an origin slower than it answers 504.
    const slow = countingBucket(500);
    const res = await send(await stored(), { ORIGIN_TIMEOUT_MS: 20, IMAGES: slow.bucket });
    expect(res.status).toBe(504);
    expect(logged.join("\n")).not.toContain("configuration error");
  });

  it.each([0, -5, 1.5, Number.NaN, Infinity, 2 ** 53])(
    "refuses ORIGIN_TIMEOUT_MS %s, naming it",
    async (value) => {
      await expectTimeoutRefused(value);
    },
  );

  it("takes a boolean for GALLERY: false is off, true is on", async () => {
    const off = await send(`${newBase()}/`, { GALLERY: false });
    expect(off.status).toBe(404);
    expect((await send(await stored(), { GALLERY: false })).status).toBe(200);
    const on = await send(`${newBase()}/`, { GALLERY: true });
    expect(on.status).toBe(200);
    expect(on.headers.get("Content-Type")).toContain("text/html");
  });

  it("holds a boolean GALLERY to the rules of its words", async () => {
    const logged = captureErrors();
    // Behind SIGNING_SECRET the gallery is "off" or "signed", never "on".
    const res = await send(await stored(), { SIGNING_SECRET: SECRET, GALLERY: true });
    expect(res.status).toBe(500);
    expect(logged).toEqual([expect.stringContaining("GALLERY")]);
    expect((await send(`${newBase()}/`, { SIGNING_SECRET: SECRET, GALLERY: false })).status).toBe(
      404,
    );
  });
});

describe("settings given as JSON values they cannot mean", () => {
  const S3 = {
    ORIGIN: "s3",
    S3_ENDPOINT: "https://s3.example.net",
    S3_BUCKET: "imagegen-images",
    S3_ACCESS_KEY_ID: "AKIDEXAMPLE0123456789",
    S3_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
  };
  it.each<[string, Record<string, unknown>]>([
    ["ORIGIN", { ORIGIN: 7 }],
    ["ORIGIN", { ORIGIN: null }],
    ["ORIGIN", { ORIGIN: ["r2"] }],
    ["ORIGIN_PREFIX", { ORIGIN_PREFIX: 7 }],
    ["ORIGIN_PREFIX", { ORIGIN_PREFIX: false }],
    ["ORIGIN_TIMEOUT_MS", { ORIGIN_TIMEOUT_MS: true }],
    ["ORIGIN_TIMEOUT_MS", { ORIGIN_TIMEOUT_MS: null }],
    ["GALLERY", { GALLERY: 0 }],
    ["GALLERY", { GALLERY: null }],
    ["S3_REGION", { ...S3, S3_REGION: 1 }],
    ["S3_BUCKET", { ...S3, S3_BUCKET: 2026 }],
    ["S3_ENDPOINT", { ...S3, S3_ENDPOINT: { url: "https://s3.example.net" } }],
    ["PUBLIC_ORIGIN_URL", { ORIGIN: "public", PUBLIC_ORIGIN_URL: 1 }],
  ])("%s: answers 500 and logs the setting's name", async (name, overrides) => {
    const logged = captureErrors();
    const res = await send(await stored(), overrides as Partial<Env>);
    expect(res.status).toBe(500);
    expect(await res.text()).toBe("Server Misconfigured\n");
    expect(logged).toEqual([
      `configuration error: ${name} must be a string (quoted in wrangler.jsonc's vars)`,
    ]);
  });

  it("does not look at a var the chosen ORIGIN does not read", async () => {
    const logged = captureErrors();
    // Each would be refused under the ORIGIN that reads it (above).
    const unread: Record<string, unknown> = {
      ORIGIN: "r2",
      S3_REGION: 1,
      S3_BUCKET: 2026,
      S3_ENDPOINT: { url: "https://s3.example.net" },
      PUBLIC_ORIGIN_URL: 1,
    };
    const res = await send(await stored(), unread as Partial<Env>);
    expect(res.status).toBe(200);
    expect(new Uint8Array(await res.arrayBuffer())).toEqual(bytes(10));
    expect(logged).toEqual([]);
  });

  it.each([
    { ORIGIN_TIMEOUT_MS: 5000 },
    { GALLERY: false },
    { ORIGIN_PREFIX: 7 },
    { ORIGIN: null },
  ])("%o: a path that is not served stays 404", async (overrides) => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const res = await send(`${BASE}/index.html`, overrides as Partial<Env>);
    expect(res.status).toBe(404);
    expect(await res.text()).toBe("Not Found\n");
  });
});

describe("ORIGIN_TIMEOUT_MS as text", () => {
  // Number() would read these as 16, 7, 10, 5 and 5 milliseconds.
  it.each(["0x10", "0b111", "1e1", "5.0", "+5", "05", "-5", "1_000", "１０", "9007199254740992"])(
    "refuses %o, naming it",
    async (value) => {
      const logged = await expectTimeoutRefused(value);
      expect(logged.join("\n")).not.toContain(value);
    },
  );

  it.each(["20", " 20 ", "20\n"])("takes %o as 20 ms", async (value) => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const slow = countingBucket(500);
    expect(
      (await send(await stored(), { ORIGIN_TIMEOUT_MS: value, IMAGES: slow.bucket })).status,
    ).toBe(504);
  });

  it("takes blank for the default, and the largest safe integer", async () => {
    // Each from the origin (a key of its own, not yet at the edge), which takes 50 ms.
    const slow = countingBucket(50);
    const blank = await send(await stored(), { ORIGIN_TIMEOUT_MS: " ", IMAGES: slow.bucket });
    expect(blank.status).toBe(200);
    const largest = String(Number.MAX_SAFE_INTEGER);
    const res = await send(await stored(), { ORIGIN_TIMEOUT_MS: largest, IMAGES: slow.bucket });
    expect(res.status).toBe(200);
    expect(slow.gets()).toBe(2);
  });
});
