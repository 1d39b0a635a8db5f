import { env, exports } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ConfigError, readConfig } from "../src/config";
import { isPublicKey, keyFromPath } from "../src/keys";
import { sign } from "../src/signing";
import { BASE, countingBucket, mockFetch, newKey, send } from "./helpers";

afterEach(() => {
  vi.restoreAllMocks();
});

describe("methods", () => {
  it.each(["POST", "PUT", "DELETE", "PATCH"])("%s answers 405 with Allow", async (method) => {
    const res = await send(new Request(`${BASE}/${newKey()}`, { method }));
    expect(res.status).toBe(405);
    // OPTIONS is answered (204) on served paths, so it is allowed too (RFC 9110 §10.2.1).
    expect(res.headers.get("Allow")).toBe("GET, HEAD, OPTIONS");
  });

  it("OPTIONS answers a CORS preflight", async () => {
    const res = await send(
      new Request(`${BASE}/${newKey()}`, {
        method: "OPTIONS",
        headers: {
          Origin: "https://app.example.com",
          "Access-Control-Request-Method": "GET",
          "Access-Control-Request-Headers": "range",
        },
      }),
    );
    expect(res.status).toBe(204);
    expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
    expect(res.headers.get("Access-Control-Allow-Methods")).toContain("GET");
    const allowed = res.headers.get("Access-Control-Allow-Headers")?.split(", ");
    // Every request header the Worker reads (RFC 9110 §13.1, §14.2): a cross-origin fetch that
    // sends one of them is preflighted, and refused unless it is listed.
    for (const header of [
      "Range",
      "If-Match",
      "If-None-Match",
      "If-Modified-Since",
      "If-Unmodified-Since",
      "If-Range",
    ]) {
      expect(allowed, header).toContain(header);
    }
    expect(res.headers.get("Access-Control-Max-Age")).toBe("86400");
    expect(res.headers.get("Allow")).toBe("GET, HEAD, OPTIONS");
  });

  it("answers OPTIONS 404 where every other method is answered 404", async () => {
    const r2 = countingBucket();
    for (const [path, overrides] of [
      ["/robots.txt", {}],
      ["/2026/05/01/abc.json", {}],
      ["/2026/05/01/../../../secret.png", {}],
      ["/", { GALLERY: "off" }],
      ["/2026/05/01/", { GALLERY: "off" }],
    ] as const) {
      const options = await send(new Request(`${BASE}${path}`, { method: "OPTIONS" }), {
        IMAGES: r2.bucket,
        ...overrides,
      });
      const get = await send(`${BASE}${path}`, { IMAGES: r2.bucket, ...overrides });
      expect([options.status, get.status], path).toEqual([404, 404]);
      expect(options.headers.get("Allow")).toBeNull();
    }
    expect(r2.calls).toHaveLength(0);
  });

  it("answers OPTIONS 204 on served paths without reaching the origin", async () => {
    const r2 = countingBucket();
    for (const path of [`/${newKey()}`, `/${newKey("thumb")}`, "/", "/2026/05/01/"]) {
      const res = await send(new Request(`${BASE}${path}`, { method: "OPTIONS" }), {
        IMAGES: r2.bucket,
      });
      expect(res.status, path).toBe(204);
      expect(res.headers.get("Allow")).toBe("GET, HEAD, OPTIONS");
    }
    expect(r2.calls).toHaveLength(0);
  });
});

describe("paths that are not served keys", () => {
  const bad = [
    "/robots.txt",
    "/2026/05/",
    "/2026/13/01",
    "/2026/05/01/abc.json",
    "/2026/05/01/abc.webp",
    "/2026/05/01/abc.thumb.png",
    "/2026/05/01/abc.PNG",
    "/2026/05/01/a.b.png",
    "/2026/05/01/_abc.png",
    "/2026/13/01/abc.png",
    "/2026/05/32/abc.png",
    "/2026/5/1/abc.png",
    "/2026/05/01//abc.png",
    "//2026/05/01/abc.png",
    "/2026%2F05%2F01%2Fabc.png",
    "/2026/05/01/abc%2Epng",
    "/2026/05/01%2F..%2F..%2Fsecret.png",
    "/2026/05/01/../../../secret.png",
    "/2026/05/01/%2e%2e/%2e%2e/x.png",
    "/images/2026/05/01/abc.png",
    "/2026/05/01/abc.png/",
    "/2026/05/01/abc.png;x",
    `/2026/05/01/${"a".repeat(129)}.png`,
  ];

  it.each(bad)("%s answers 404 without reaching the origin", async (path) => {
    const r2 = countingBucket();
    const { calls } = mockFetch(() => new Response("origin must not be called", { status: 500 }));
    for (const origin of [
      { ORIGIN: "r2", IMAGES: r2.bucket },
      { ORIGIN: "public", PUBLIC_ORIGIN_URL: "https://bucket.example.net" },
    ]) {
      const res = await send(`${BASE}${path}`, origin);
      expect(res.status).toBe(404);
      expect(res.headers.get("Cache-Control")).toBe("no-store");
    }
    expect(r2.gets()).toBe(0);
    expect(calls).toHaveLength(0);
  });

  it("ignores query parameters that look like a host", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "x");
    const { calls } = mockFetch(() => new Response("no"));
    const res = await send(`${BASE}/${key}?origin=https://evil.example&url=https://evil.example/x`);
    expect(res.status).toBe(200);
    expect(calls).toHaveLength(0);
  });
});

describe("paths answered without the origin", () => {
  it("/favicon.ico answers 204, kept a day", async () => {
    const r2 = countingBucket();
    for (const method of ["GET", "HEAD"]) {
      const res = await send(new Request(`${BASE}/favicon.ico`, { method }), { IMAGES: r2.bucket });
      expect(res.status, method).toBe(204);
      expect(res.headers.get("Cache-Control")).toBe("public, max-age=86400");
    }
    expect(r2.calls).toHaveLength(0);
  });

  it("redirects a day without its trailing slash to the day's page, query and all", async () => {
    const r2 = countingBucket();
    for (const [path, location] of [
      ["/2026/05/01", "/2026/05/01/"],
      ["/2026/05/01?page=2", "/2026/05/01/?page=2"],
      ["/2026/05/01?expires=9&signature=ab", "/2026/05/01/?expires=9&signature=ab"],
    ]) {
      const res = await send(`${BASE}${path}`, { IMAGES: r2.bucket });
      expect(res.status, path).toBe(301);
      expect(res.headers.get("Location")).toBe(location);
    }
    expect(r2.calls).toHaveLength(0);
    // No gallery: nothing to redirect to.
    expect((await send(`${BASE}/2026/05/01`, { GALLERY: "off" })).status).toBe(404);
  });

  it("gives the favicon and the redirect the headers every other answer has", async () => {
    const names = [
      "Content-Security-Policy",
      "X-Content-Type-Options",
      "Access-Control-Allow-Origin",
      "Cross-Origin-Resource-Policy",
    ];
    const headersOf = (res: Response) => names.map((name) => [name, res.headers.get(name)]);
    const notFound = await send(`${BASE}/robots.txt`);
    expect(notFound.headers.get("Content-Security-Policy")).toBe("default-src 'none'; sandbox");
    expect(notFound.headers.get("X-Content-Type-Options")).toBe("nosniff");
    for (const path of ["/favicon.ico", "/2026/05/01?page=2"]) {
      for (const method of ["GET", "HEAD"]) {
        const res = await send(new Request(`${BASE}${path}`, { method }));
        expect(headersOf(res), `${method} ${path}`).toEqual(headersOf(notFound));
      }
    }
  });

  it("keeps a signed day link that lost its slash valid through the redirect", async () => {
    const day = "2026/05/01/";
    await env.IMAGES.put(`${day}slash.png`, "png");
    const secret = "slash-signing-secret";
    const expires = Math.floor(Date.now() / 1000) + 600;
    const query = `?expires=${expires}&signature=${await sign(day, expires, secret)}`;
    const overrides = { SIGNING_SECRET: secret, GALLERY: "signed" };
    const res = await send(`${BASE}/2026/05/01${query}`, overrides);
    expect(res.status).toBe(301);
    const target = await send(`${BASE}${res.headers.get("Location")}`, overrides);
    expect(target.status).toBe(200);
  });
});

describe("key shapes", () => {
  it("accepts the full image and the thumbnail", () => {
    expect(isPublicKey("2026/05/01/abc.png")).toBe(true);
    expect(isPublicKey("2026/05/01/abc.thumb.webp")).toBe(true);
    expect(isPublicKey(`0001/12/31/${"a".repeat(128)}.png`)).toBe(true);
  });

  it("maps only raw, slash-led paths", () => {
    expect(keyFromPath("/2026/05/01/abc.png")).toBe("2026/05/01/abc.png");
    expect(keyFromPath("2026/05/01/abc.png")).toBeNull();
    expect(keyFromPath("/2026/05/01/abc.json")).toBeNull();
  });
});

describe("configuration", () => {
  it.each([
    [{ ORIGIN: "ftp" }],
    [{ ORIGIN: "s3" }],
    [{ ORIGIN: "public", PUBLIC_ORIGIN_URL: "not a url" }],
    // What imagegen/storage/s3.py `_check_prefix` refuses (imagegen/storage/base.py
    // `validate_key`): dot segments, empty segments, other characters, long segments.
    [{ ORIGIN_PREFIX: "../" }],
    [{ ORIGIN_PREFIX: "images/../other" }],
    [{ ORIGIN_PREFIX: "./images" }],
    [{ ORIGIN_PREFIX: "images//raw" }],
    [{ ORIGIN_PREFIX: ".hidden/" }],
    [{ ORIGIN_PREFIX: "-images" }],
    [{ ORIGIN_PREFIX: "images\\raw" }],
    [{ ORIGIN_PREFIX: " images" }],
    [{ ORIGIN_PREFIX: "images/ raw" }],
    [{ ORIGIN_TIMEOUT_MS: "soon" }],
  ])("%o answers 500 and names no value", async (overrides) => {
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    const res = await send(`${BASE}/${newKey()}`, overrides);
    expect(res.status).toBe(500);
    expect(await res.text()).toBe("Server Misconfigured\n");
    expect(errors).toHaveBeenCalledOnce();
  });
});

describe("ORIGIN_PREFIX", () => {
  // Spelled as the functions take the prefix of IMAGEGEN_STORAGE_URL (imagegen/storage/s3.py
  // `_check_prefix`): one prefix with or without slashes at either end.
  it.each([
    ["", ""],
    ["/", ""],
    ["images", "images/"],
    ["images/", "images/"],
    ["/images/", "images/"],
    ["//out/images//", "out/images/"],
    ["_x.y-z", "_x.y-z/"],
  ])("%o is the prefix %o", (value, prefix) => {
    expect(readConfig({ ...env, ORIGIN_PREFIX: value }).prefix).toBe(prefix);
  });

  it("takes segments of up to 200 characters, up to 512 in all", async () => {
    const prefix = (value: string) => readConfig({ ...env, ORIGIN_PREFIX: value }).prefix;
    expect(prefix("a".repeat(200))).toBe(`${"a".repeat(200)}/`);
    expect(prefix(`/${"a/".repeat(255)}a/`)).toBe(`${"a/".repeat(256)}`);
    expect(() => prefix("a".repeat(201))).toThrow(ConfigError);
    expect(() => prefix(`${"a/".repeat(256)}a`)).toThrow(ConfigError);
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    const res = await send(`${BASE}/${newKey()}`, { ORIGIN_PREFIX: "a".repeat(201) });
    expect(res.status).toBe(500);
    expect(errors).toHaveBeenCalledOnce();
  });
});

describe("deployed entry point", () => {
  it("serves through the runtime with the bindings and vars of wrangler.jsonc", async () => {
    const key = newKey("thumb");
    await env.IMAGES.put(key, new Uint8Array([82, 73, 70, 70]), {
      httpMetadata: { contentType: "image/webp" },
    });
    const res = await exports.default.fetch(`${BASE}/${key}`);
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toBe("image/webp");
    expect(new Uint8Array(await res.arrayBuffer())).toEqual(new Uint8Array([82, 73, 70, 70]));

    const head = await exports.default.fetch(`${BASE}/${key}`, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(head.headers.get("ETag")).toBe(res.headers.get("ETag"));
    expect(
      (await exports.default.fetch(`${BASE}/${key.replace(".thumb.webp", ".json")}`)).status,
    ).toBe(404);
  });
});
