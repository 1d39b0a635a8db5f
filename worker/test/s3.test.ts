import { afterEach, describe, expect, it, vi } from "vitest";
import type { Env } from "../src/config";
import { NOT_FOUND_TTL } from "../src/http";
import { BASE, bytes, mockFetch, newBase, newKey, send } from "./helpers";

const ACCESS_KEY_ID = "AKIDEXAMPLE0123456789";
const SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

const S3: Partial<Env> = {
  ORIGIN: "s3",
  S3_ENDPOINT: "https://s3.example.net/",
  S3_BUCKET: "imagegen-images",
  S3_REGION: "eu-west-3",
  S3_ACCESS_KEY_ID: ACCESS_KEY_ID,
  S3_SECRET_ACCESS_KEY: SECRET_ACCESS_KEY,
  ORIGIN_PREFIX: "images/",
};

const LAST_MODIFIED = "Fri, 01 May 2026 10:00:00 GMT";

function objectResponse(size = 64): Response {
  return new Response(bytes(size), {
    headers: {
      "Content-Type": "image/png",
      "Content-Length": String(size),
      ETag: '"0123456789abcdef"',
      "Last-Modified": LAST_MODIFIED,
      "x-amz-request-id": "REQ123",
      "x-amz-meta-owner": "someone",
    },
  });
}

/**
 * A bucket of one `size`-byte object that reads Range as S3 does (one range per GET:
 * docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html, "Range"; RFC 9110 §14.1.2 for
 * its forms): `first-last`, `first-` or `-suffix`, in digits of any length, is cut (206) or,
 * when it holds no byte, refused (416 with the size); anything else is ignored and the whole
 * object sent (200), as RFC 9110 §14.2 lets a server do with a Range it cannot read.
 */
function s3Ranges(size: number): (request: Request) => Response {
  return (request) => {
    const whole = objectResponse(size);
    if (request.method === "HEAD") return new Response(null, whole);
    const match = /^bytes=(\d*)-(\d*)$/.exec(request.headers.get("Range") ?? "");
    const [first, last] = [match?.[1] ?? "", match?.[2] ?? ""];
    if (first === "" && last === "") return whole;
    const total = BigInt(size);
    let start: bigint;
    let stop = total - 1n;
    if (first === "") {
      const suffix = BigInt(last);
      if (suffix === 0n)
        start = total; // "-0" holds no byte
      else start = suffix < total ? total - suffix : 0n;
    } else {
      start = BigInt(first);
      if (last !== "" && BigInt(last) < start) return whole;
      if (last !== "" && BigInt(last) < stop) stop = BigInt(last);
    }
    if (start >= total) {
      return new Response(null, { status: 416, headers: { "Content-Range": `bytes */${size}` } });
    }
    return new Response(bytes(size).slice(Number(start), Number(stop) + 1), {
      status: 206,
      headers: {
        "Content-Range": `bytes ${start}-${stop}/${size}`,
        "Content-Length": String(stop - start + 1n),
        ETag: '"0123456789abcdef"',
        "Last-Modified": LAST_MODIFIED,
      },
    });
  };
}

/** An origin answer whose body never ends; `cancelled` says whether the Worker gave it up. */
function stalled(): { response: Response; cancelled: () => boolean } {
  let cancelled = false;
  const body = new ReadableStream({
    pull() {},
    cancel() {
      cancelled = true;
    },
  });
  return { response: new Response(body, { headers: { ETag: '"x"' } }), cancelled: () => cancelled };
}

/** An origin answer whose body fails after its first bytes (a connection reset). */
function broken(): Response {
  let sent = false;
  const body = new ReadableStream({
    pull(controller) {
      if (sent) return controller.error(new Error("connection reset"));
      sent = true;
      controller.enqueue(new Uint8Array(10));
    },
  });
  return new Response(body, { headers: { ETag: '"x"', "Content-Length": "64" } });
}

/** The status `response` answers, or a note that it had not answered within 2 s. */
function statusWithin2s(response: Promise<Response>): Promise<number | string> {
  const late = new Promise<string>((resolve) =>
    setTimeout(() => resolve("no answer within 2 s"), 2000),
  );
  return Promise.race([response.then((r) => r.status), late]);
}

function abortable(request: Request): Promise<Response> {
  return new Promise((_, reject) => {
    request.signal.addEventListener("abort", () =>
      reject(new DOMException("aborted", "AbortError")),
    );
  });
}

async function expectNoSecret(res: Response, logged: string[]): Promise<void> {
  const everything = [
    ...[...res.headers].map(([name, value]) => `${name}: ${value}`),
    new TextDecoder().decode(await res.clone().arrayBuffer()),
    ...logged,
  ].join("\n");
  expect(everything).not.toContain(SECRET_ACCESS_KEY);
  expect(everything).not.toContain(ACCESS_KEY_ID);
  expect(everything).not.toContain("AWS4-HMAC-SHA256");
  expect(everything.toLowerCase()).not.toContain("x-amz");
}

function captureLogs(): string[] {
  const lines: string[] = [];
  for (const level of ["log", "info", "warn", "error", "debug"] as const) {
    vi.spyOn(console, level).mockImplementation((...args: unknown[]) => {
      lines.push(args.map(String).join(" "));
    });
  }
  return lines;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("S3-compatible origin", () => {
  it("sends a SigV4-signed path-style GET and serves the object", async () => {
    const logged = captureLogs();
    const key = newKey();
    const { calls } = mockFetch(() => objectResponse());
    const res = await send(`${BASE}/${key}`, S3);

    expect(res.status).toBe(200);
    expect(new Uint8Array(await res.clone().arrayBuffer())).toEqual(bytes(64));
    expect(res.headers.get("ETag")).toBe('"0123456789abcdef"');
    expect(res.headers.get("Last-Modified")).toBe(LAST_MODIFIED);
    expect(res.headers.get("Content-Type")).toBe("image/png");

    expect(calls).toHaveLength(1);
    const [origin] = calls;
    expect(origin?.method).toBe("GET");
    expect(origin?.url).toBe(`https://s3.example.net/imagegen-images/images/${key}`);
    const authorization = origin?.headers.get("Authorization") ?? "";
    expect(authorization).toMatch(
      new RegExp(
        `^AWS4-HMAC-SHA256 Credential=${ACCESS_KEY_ID}/\\d{8}/eu-west-3/s3/aws4_request, ` +
          "SignedHeaders=[a-z0-9;-]*host[a-z0-9;-]*, Signature=[0-9a-f]{64}$",
      ),
    );
    expect(authorization).not.toContain(SECRET_ACCESS_KEY);
    expect(origin?.headers.get("x-amz-date")).toMatch(/^\d{8}T\d{6}Z$/);
    expect(origin?.headers.get("x-amz-content-sha256")).toBe("UNSIGNED-PAYLOAD");

    await expectNoSecret(res, logged);
  });

  it("defaults the region to auto", async () => {
    const { calls } = mockFetch(() => objectResponse());
    await send(`${BASE}/${newKey()}`, { ...S3, S3_REGION: undefined });
    expect(calls[0]?.headers.get("Authorization")).toMatch(/\/\d{8}\/auto\/s3\/aws4_request,/);
  });

  it("serves repeat requests from the edge cache", async () => {
    const key = newKey();
    const { calls } = mockFetch(() => objectResponse());
    expect((await send(`${BASE}/${key}`, S3)).status).toBe(200);
    expect(
      (await send(new Request(`${BASE}/${key}`, { headers: { Range: "bytes=0-3" } }), S3)).status,
    ).toBe(206);
    expect((await send(`${BASE}/${key}`, S3)).status).toBe(200);
    expect(calls).toHaveLength(1);
  });

  it("answers 404 when the bucket has no such object", async () => {
    mockFetch(() => new Response("<Error><Code>NoSuchKey</Code></Error>", { status: 404 }));
    const res = await send(`${BASE}/${newKey()}`, S3);
    expect(res.status).toBe(404);
    expect(await res.text()).toBe("Not Found\n");
  });

  it("answers 503 after retrying a busy bucket, without leaking its answer", async () => {
    const logged = captureLogs();
    const { calls } = mockFetch(
      () =>
        new Response(`<Error><Code>InternalError</Code><Key>${SECRET_ACCESS_KEY}</Key></Error>`, {
          status: 503,
          headers: { "x-amz-request-id": "REQ" },
        }),
    );
    const res = await send(`${BASE}/${newKey()}`, S3);
    expect(res.status).toBe(503);
    expect(await res.clone().text()).toBe("Origin Busy\n");
    expect(res.headers.get("Retry-After")).toBe("5");
    expect(calls.length).toBeGreaterThan(1);
    await expectNoSecret(res, logged);
  });

  it.each(["SignatureDoesNotMatch", "InvalidAccessKeyId"])(
    "answers 502 when the bucket refuses the credentials (%s)",
    async (code) => {
      const logged = captureLogs();
      const { calls } = mockFetch(
        () => new Response(`<Error><Code>${code}</Code></Error>`, { status: 403 }),
      );
      const res = await send(`${BASE}/${newKey()}`, S3);
      expect(res.status).toBe(502);
      expect(calls).toHaveLength(1);
      await expectNoSecret(res, logged);
    },
  );

  it("answers 502 on a network error", async () => {
    const logged = captureLogs();
    mockFetch(() => {
      throw new TypeError(`connect failed with ${SECRET_ACCESS_KEY}`);
    });
    const res = await send(`${BASE}/${newKey()}`, S3);
    expect(res.status).toBe(502);
    expect(logged.join("\n")).toContain("origin s3 failed");
    await expectNoSecret(res, logged);
  });

  it("answers 504 when the bucket does not answer in time", async () => {
    const logged = captureLogs();
    const { calls } = mockFetch(abortable);
    const res = await send(`${BASE}/${newKey()}`, { ...S3, ORIGIN_TIMEOUT_MS: "30" });
    expect(res.status).toBe(504);
    expect(await res.clone().text()).toBe("Origin Timeout\n");
    expect(calls[0]?.signal.aborted).toBe(true);
    await expectNoSecret(res, logged);
  });
});

// Amazon S3 answers 403 AccessDenied for a key that does not exist when the caller may not list
// the bucket (docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html, "Permissions"): the
// usual public-read bucket policy, and keys granted s3:GetObject alone.
describe("a bucket that may not be listed", () => {
  const PUBLIC: Partial<Env> = {
    ORIGIN: "public",
    PUBLIC_ORIGIN_URL: "https://bucket.s3.example.net",
  };

  function unlisted(request: Request): Response {
    if (request.url.endsWith(".png") && !request.url.includes("missing")) return objectResponse();
    // S3 answers a HEAD without a body.
    const body = request.method === "HEAD" ? null : "<Error><Code>AccessDenied</Code></Error>";
    return new Response(body, { status: 403, headers: { "Content-Type": "application/xml" } });
  }

  it("reads its 403 as a missing key, and says so once", async () => {
    const warnings = vi.spyOn(console, "warn").mockImplementation(() => {});
    mockFetch(unlisted);
    for (const config of [PUBLIC, S3]) {
      const key = newKey();
      const avif = { Accept: "image/avif,image/webp,*/*" };
      // The derivatives and metadata records are not written yet: the PNG is served.
      const browser = await send(new Request(`${BASE}/${key}`, { headers: avif }), config);
      expect(browser.status).toBe(200);
      expect(browser.headers.get("Content-Type")).toBe("image/png");
      expect(browser.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
      // So is a thumbnail not made yet.
      const thumb = await send(`${BASE}/${key.replace(".png", ".thumb.webp")}`, config);
      expect(thumb.status).toBe(200);
      expect(thumb.headers.get("Content-Type")).toBe("image/png");
      // An image that does not exist is a 404, for GET and HEAD.
      const missing = `${BASE}/${newKey().replace("gen_", "missing_")}`;
      expect((await send(missing, config)).status).toBe(404);
      const head = new Request(missing.replace(".png", ".thumb.webp"), { method: "HEAD" });
      expect((await send(head, config)).status).toBe(404);
    }
    const said = warnings.mock.calls.map((call) => String(call[0]));
    expect(said.filter((line) => line.includes("s3:ListBucket"))).toHaveLength(1);
  });
});

// S3 answers a HEAD without a body, so its 403 cannot say whether the key is missing
// (AccessDenied) or the request was refused (SignatureDoesNotMatch, InvalidAccessKeyId, a
// skewed clock): the HEAD is answered 404, and nothing is remembered for the GET that follows.
describe("a HEAD answered 403", () => {
  it("is a 404 not remembered: a later GET gets the origin's own answer", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    vi.spyOn(console, "error").mockImplementation(() => {});
    for (const [code, status] of [
      ["SignatureDoesNotMatch", 502],
      ["InvalidAccessKeyId", 502],
      ["AccessDenied", 404],
    ] as const) {
      const key = newKey();
      const { calls } = mockFetch(
        (request) =>
          new Response(request.method === "HEAD" ? null : `<Error><Code>${code}</Code></Error>`, {
            status: 403,
          }),
      );
      const head = await send(new Request(`${BASE}/${key}`, { method: "HEAD" }), S3);
      expect(head.status, code).toBe(404);
      expect(head.headers.get("Cache-Control")).toBe("no-store");
      expect(await caches.default.match(`${BASE}/${key}`), code).toBeUndefined();
      const get = await send(`${BASE}/${key}`, S3);
      expect(get.status, code).toBe(status);
      expect(
        calls.map((c) => c.method),
        code,
      ).toEqual(["HEAD", "GET"]);
      vi.restoreAllMocks();
      vi.spyOn(console, "warn").mockImplementation(() => {});
      vi.spyOn(console, "error").mockImplementation(() => {});
    }
  });
});

describe("public bucket origin", () => {
  const PUBLIC: Partial<Env> = {
    ORIGIN: "public",
    PUBLIC_ORIGIN_URL: "https://storage.example.net/imagegen-images/",
  };

  it("fetches <PUBLIC_ORIGIN_URL>/<ORIGIN_PREFIX><key> without credentials", async () => {
    const key = newKey("thumb");
    const { calls } = mockFetch(() => objectResponse());
    const res = await send(`${BASE}/${key}`, { ...PUBLIC, ORIGIN_PREFIX: "out/" });
    expect(res.status).toBe(200);
    expect(calls[0]?.url).toBe(`https://storage.example.net/imagegen-images/out/${key}`);
    expect(calls[0]?.headers.get("Authorization")).toBeNull();
    expect(calls[0]?.redirect).toBe("manual");
  });

  it("answers 502 to a redirect instead of following it", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const { calls } = mockFetch(
      () =>
        new Response(null, { status: 302, headers: { Location: "https://elsewhere.example/" } }),
    );
    expect((await send(`${BASE}/${newKey()}`, PUBLIC)).status).toBe(502);
    expect(calls).toHaveLength(1);
  });

  it("answers 504 on timeout and 502 on a 500", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(abortable);
    expect((await send(`${BASE}/${newKey()}`, { ...PUBLIC, ORIGIN_TIMEOUT_MS: "30" })).status).toBe(
      504,
    );
    vi.restoreAllMocks();
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(() => new Response("boom", { status: 500 }));
    expect((await send(`${BASE}/${newKey()}`, PUBLIC)).status).toBe(502);
  });

  it("answers 502 when the body fails after the headers", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(broken);
    const res = await send(`${BASE}/${newKey()}`, PUBLIC);
    expect(res.status).toBe(502);
    expect(await res.text()).toBe("Origin Unavailable\n");
  });

  it("bounds the body by ORIGIN_TIMEOUT_MS too: 504, and the stream is given up", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const origin = stalled();
    mockFetch(() => origin.response);
    const res = send(`${BASE}/${newKey()}`, { ...PUBLIC, ORIGIN_TIMEOUT_MS: "50" });
    expect(await statusWithin2s(res)).toBe(504);
    expect(origin.cancelled()).toBe(true);
  });

  it("asks the origin again for a key whose last read stalled", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const key = newKey();
    const config = { ...PUBLIC, ORIGIN_TIMEOUT_MS: "50" };
    mockFetch(() => stalled().response);
    expect(await statusWithin2s(send(`${BASE}/${key}`, config))).toBe(504);
    vi.restoreAllMocks();
    const healthy = mockFetch(() => objectResponse());
    expect(await statusWithin2s(send(`${BASE}/${key}`, config))).toBe(200);
    expect(healthy.calls).toHaveLength(1);
  });

  it("bounds a record's body too: a stalled derivatives record is given up for the PNG", async () => {
    const warnings = vi.spyOn(console, "warn").mockImplementation(() => {});
    const key = newKey();
    const record = stalled();
    const { calls } = mockFetch((request) =>
      request.url.endsWith(".derivatives.json") ? record.response : objectResponse(),
    );
    const res = send(new Request(`${BASE}/${key}`, { headers: { Accept: "image/avif" } }), {
      ...PUBLIC,
      ORIGIN_TIMEOUT_MS: "50",
    });
    expect(await statusWithin2s(res)).toBe(200);
    expect((await res).headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    expect(record.cancelled()).toBe(true);
    expect(warnings).toHaveBeenCalledOnce();
    expect(calls.map((c) => new URL(c.url).pathname.split("/").pop())).toEqual([
      key.split("/").pop()?.replace(".png", ".derivatives.json"),
      key.split("/").pop(),
    ]);
  });

  it("answers 503 to a browser only when the image fails, not when its record does", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    const chrome = { Accept: "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8" };
    const key = newKey();
    // One transient refusal of the derivatives record (S3's 503 SlowDown).
    let refused = false;
    mockFetch((request) => {
      if (request.url.endsWith(".derivatives.json") && !refused) {
        refused = true;
        return new Response("<Error><Code>SlowDown</Code></Error>", { status: 503 });
      }
      if (request.url.endsWith(".json")) return new Response(null, { status: 404 });
      return objectResponse();
    });
    const res = await send(new Request(`${BASE}/${key}`, { headers: chrome }), PUBLIC);
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toBe("image/png");
    expect(errors).not.toHaveBeenCalled();
    vi.restoreAllMocks();
    vi.spyOn(console, "warn").mockImplementation(() => {});
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(() => new Response("<Error><Code>SlowDown</Code></Error>", { status: 503 }));
    expect(
      (await send(new Request(`${BASE}/${newKey()}`, { headers: chrome }), PUBLIC)).status,
    ).toBe(503);
  });
});

describe("S3-compatible origin on a cache miss", () => {
  it("passes Range, validators and HEAD to the origin as they are", async () => {
    const { calls } = mockFetch((request) => {
      if (request.method === "HEAD") return new Response(null, objectResponse(64));
      if (request.headers.get("If-None-Match") === '"0123456789abcdef"') {
        return new Response(null, { status: 304, headers: { ETag: '"0123456789abcdef"' } });
      }
      return new Response(bytes(64).slice(8, 16), {
        status: 206,
        headers: {
          "Content-Range": "bytes 8-15/64",
          "Content-Length": "8",
          ETag: '"0123456789abcdef"',
        },
      });
    });
    const url = `${BASE}/${newKey()}`;
    const part = await send(new Request(url, { headers: { Range: "bytes=8-15" } }), S3);
    expect(part.status).toBe(206);
    expect(part.headers.get("Content-Range")).toBe("bytes 8-15/64");
    expect(new Uint8Array(await part.arrayBuffer())).toEqual(bytes(64).slice(8, 16));
    const same = await send(
      new Request(url, { headers: { "If-None-Match": '"0123456789abcdef"' } }),
      S3,
    );
    expect(same.status).toBe(304);
    const head = await send(new Request(url, { method: "HEAD" }), S3);
    expect(head.status).toBe(200);
    expect(head.headers.get("Content-Length")).toBe("64");
    expect(
      calls.map((c) => [c.method, c.headers.get("Range"), c.headers.get("If-None-Match")]),
    ).toEqual([
      ["GET", "bytes=8-15", null],
      ["GET", null, '"0123456789abcdef"'],
      ["HEAD", null, null],
    ]);
  });

  // moto (the Python tests' S3) answers an unsatisfiable range with an XML body and no
  // Content-Range; the client's 416 must still say the size (RFC 9110 §15.5.17).
  it("answers 416 with the size when the origin's 416 does not say it", async () => {
    const { calls } = mockFetch((request) => {
      if (request.method === "HEAD") return new Response(null, objectResponse(64));
      return new Response("<Error><Code>InvalidRange</Code></Error>", {
        status: 416,
        headers: { "Content-Type": "application/xml" },
      });
    });
    const url = `${BASE}/${newKey()}`;
    const res = await send(new Request(url, { headers: { Range: "bytes=5000-" } }), S3);
    expect(res.status).toBe(416);
    expect(res.headers.get("Content-Range")).toBe("bytes */64");
    expect(calls.map((c) => [c.method, c.headers.get("Range")])).toEqual([
      ["GET", "bytes=5000-"],
      ["HEAD", null],
    ]);
  });

  // Positions past Number.MAX_SAFE_INTEGER: 400 digits made Infinity, and "bytes=0-Infinity"
  // is no range a bucket reads, so it answered the whole object (200) where R2 and a cache hit
  // answer 206. No object is that large: a last position past it is the end of the object.
  const HUGE = "9".repeat(400);
  it.each([
    ["bytes=0-<400 nines>", "bytes=0-", `bytes=0-${HUGE}`, 0],
    ["bytes=0-9007199254740992", "bytes=0-", "bytes=0-9007199254740992", 0],
    ["bytes=60-<400 nines>", "bytes=60-", `bytes=60-${HUGE}`, 60],
    ["bytes=8-9007199254740991", "bytes=8-9007199254740991", "bytes=8-9007199254740991", 8],
    ["bytes=-<400 nines>", "bytes=0-", `bytes=-${HUGE}`, 0],
    ["bytes=-0<400 nines>", "bytes=0-", `bytes=-0${HUGE}`, 0],
  ])("asks for %s as %s, and answers 206 to the end", async (_, sent, range, start) => {
    const { calls } = mockFetch(s3Ranges(64));
    const url = `${BASE}/${newKey()}`;
    const miss = await send(new Request(url, { headers: { Range: range } }), S3);
    expect(miss.status).toBe(206);
    expect(miss.headers.get("Content-Range")).toBe(`bytes ${start}-63/64`);
    expect(new Uint8Array(await miss.arrayBuffer())).toEqual(bytes(64).slice(start));
    expect(calls.map((c) => c.headers.get("Range"))).toEqual([sent]);
    // A hit cuts the same range from the cached object.
    await send(url, S3);
    const hit = await send(new Request(url, { headers: { Range: range } }), S3);
    expect([hit.status, hit.headers.get("Content-Range")]).toEqual([206, `bytes ${start}-63/64`]);
  });

  it.each([
    ["bytes=<400 nines>-", `bytes=${HUGE}-`],
    ["bytes=<400 nines>-<400 nines>", `bytes=${HUGE}-${HUGE}`],
    ["bytes=9007199254740992-", "bytes=9007199254740992-"],
  ])("answers %s 416, a first position past any object, as a hit does", async (_, range) => {
    const { calls } = mockFetch(s3Ranges(64));
    const url = `${BASE}/${newKey()}`;
    const miss = await send(new Request(url, { headers: { Range: range } }), S3);
    expect([miss.status, miss.headers.get("Content-Range")]).toEqual([416, "bytes */64"]);
    expect(calls.map((c) => c.headers.get("Range"))).toEqual([`bytes=${Number.MAX_SAFE_INTEGER}-`]);
    await send(url, S3);
    const hit = await send(new Request(url, { headers: { Range: range } }), S3);
    expect([hit.status, hit.headers.get("Content-Range")]).toEqual([416, "bytes */64"]);
  });

  it("ignores a last position before a first past Number.MAX_SAFE_INTEGER, as a hit does", async () => {
    const { calls } = mockFetch(s3Ranges(64));
    const url = `${BASE}/${newKey()}`;
    const range = `bytes=${"9".repeat(20)}-1`;
    const miss = await send(new Request(url, { headers: { Range: range } }), S3);
    expect(miss.status).toBe(200);
    expect(calls.map((c) => c.headers.get("Range"))).toEqual([null]);
    const hit = await send(new Request(url, { headers: { Range: range } }), S3);
    expect(hit.status).toBe(200);
  });

  it("lists day folders and records for the gallery with ListObjectsV2", async () => {
    const { calls } = mockFetch((request) => {
      const params = new URL(request.url).searchParams;
      const prefix = params.get("prefix") ?? "";
      const folders: Record<string, string[]> = {
        "images/": ["images/2026/"],
        "images/2026/": ["images/2026/05/"],
        "images/2026/05/": ["images/2026/05/01/"],
      };
      if (params.get("delimiter") === "/") {
        const common = (folders[prefix] ?? [])
          .map((p) => `<CommonPrefixes><Prefix>${p}</Prefix></CommonPrefixes>`)
          .join("");
        return new Response(`<ListBucketResult>${common}</ListBucketResult>`);
      }
      if (prefix === "images/2026/05/01/") {
        // Two pages: the record is on the second, behind a continuation token.
        if (params.get("continuation-token") !== "page 2") {
          return new Response(
            "<ListBucketResult><Contents><Key>images/2026/05/01/a0.png</Key></Contents>" +
              "<IsTruncated>true</IsTruncated>" +
              "<NextContinuationToken>page 2</NextContinuationToken></ListBucketResult>",
          );
        }
        return new Response(
          "<ListBucketResult><Contents><Key>images/2026/05/01/a1.json</Key>" +
            "<LastModified>2026-05-01T00:00:01.000Z</LastModified></Contents>" +
            "<IsTruncated>false</IsTruncated></ListBucketResult>",
        );
      }
      const record = {
        persisted: {
          prompt: "fish &amp; chips",
          seed: 1,
          model: "m",
          width: 8,
          height: 8,
          created_at: "2026-05-01T00:00:00Z",
          keys: {},
        },
      };
      return new Response(JSON.stringify(record), { headers: { "Content-Length": "" } });
    });
    const res = await send(`${newBase()}/`, S3);
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(html).toContain("Images of 2026-05-01");
    expect(html).toContain("fish &amp;amp; chips");
    const urls = calls.map((c) => new URL(c.url));
    expect(urls.every((u) => u.host === "s3.example.net")).toBe(true);
    // The image's record, then the record of its derivatives.
    expect(urls.slice(-2).map((u) => u.pathname)).toEqual([
      "/imagegen-images/images/2026/05/01/a1.json",
      "/imagegen-images/images/2026/05/01/a1.derivatives.json",
    ]);
    expect(calls.every((c) => c.headers.get("Authorization")?.startsWith("AWS4-HMAC-SHA256"))).toBe(
      true,
    );
  });
});
