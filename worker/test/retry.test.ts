import { afterEach, describe, expect, it, vi } from "vitest";
import type { Env } from "../src/config";
import { DEFAULT_RETRY_AFTER, MAX_RETRY_AFTER, retryAfterSeconds } from "../src/origins";
import { BASE, countingBucket, mockFetch, newBase, newKey, send } from "./helpers";

const PUBLIC: Partial<Env> = {
  ORIGIN: "public",
  PUBLIC_ORIGIN_URL: "https://storage.example.net/imagegen-images",
};

const S3: Partial<Env> = {
  ORIGIN: "s3",
  S3_ENDPOINT: "https://s3.example.net",
  S3_BUCKET: "imagegen-images",
  S3_ACCESS_KEY_ID: "AKIDEXAMPLE0123456789",
  S3_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
};

const BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

afterEach(() => {
  vi.restoreAllMocks();
});

/** The answer to a GET of a fresh image key while the origin answers `answer`. */
async function failing(
  answer: () => Response,
  origin: Partial<Env> = PUBLIC,
  accept = "*/*",
): Promise<Response> {
  vi.spyOn(console, "error").mockImplementation(() => {});
  vi.spyOn(console, "warn").mockImplementation(() => {});
  mockFetch(answer);
  return send(new Request(`${BASE}/${newKey()}`, { headers: { Accept: accept } }), origin);
}

describe("an origin that is busy or failing", () => {
  it.each([503, 429])("answers the origin's %i as 503, with its Retry-After", async (status) => {
    const res = await failing(
      () => new Response("busy", { status, headers: { "Retry-After": "7" } }),
    );
    expect(res.status).toBe(503);
    expect(await res.text()).toBe("Origin Busy\n");
    expect(res.headers.get("Retry-After")).toBe("7");
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });

  it("answers the origin's 500 as 502, with its Retry-After", async () => {
    const res = await failing(
      () => new Response("boom", { status: 500, headers: { "Retry-After": "7" } }),
    );
    expect(res.status).toBe(502);
    expect(await res.text()).toBe("Origin Unavailable\n");
    expect(res.headers.get("Retry-After")).toBe("7");
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });

  it("asks for a retry after a few seconds where the origin says nothing", async () => {
    for (const [status, answer] of [
      [503, 503],
      [500, 502],
      [502, 502],
      [408, 502],
    ]) {
      const res = await failing(() => new Response(null, { status }));
      expect(res.status).toBe(answer);
      expect(res.headers.get("Retry-After")).toBe(String(DEFAULT_RETRY_AFTER));
      vi.restoreAllMocks();
    }
  });

  it("passes the S3 API's Retry-After on after retrying", async () => {
    const res = await failing(
      () =>
        new Response("<Error><Code>SlowDown</Code></Error>", {
          status: 503,
          headers: { "Retry-After": "7" },
        }),
      S3,
    );
    expect(res.status).toBe(503);
    expect(res.headers.get("Retry-After")).toBe("7");
  });

  it("carries Retry-After on the page a browser opens", async () => {
    const res = await failing(
      () => new Response(null, { status: 503, headers: { "Retry-After": "7" } }),
      PUBLIC,
      BROWSER,
    );
    expect(res.status).toBe(503);
    expect(res.headers.get("Content-Type")).toContain("text/html");
    expect(res.headers.get("Retry-After")).toBe("7");
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });

  it("answers a timeout 504 with a Retry-After", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    const slow = countingBucket(500);
    const res = await send(`${BASE}/${newKey()}`, { IMAGES: slow.bucket, ORIGIN_TIMEOUT_MS: "20" });
    expect(res.status).toBe(504);
    expect(res.headers.get("Retry-After")).toBe(String(DEFAULT_RETRY_AFTER));
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });

  it("answers a network error 502 with a Retry-After", async () => {
    const res = await failing(() => {
      throw new TypeError("connection reset");
    });
    expect(res.status).toBe(502);
    expect(res.headers.get("Retry-After")).toBe(String(DEFAULT_RETRY_AFTER));
  });

  it.each([
    [
      "a refusal (403)",
      () => new Response("<Error><Code>SignatureDoesNotMatch</Code></Error>", { status: 403 }),
    ],
    [
      "a redirect",
      () =>
        new Response(null, {
          status: 302,
          headers: { Location: "https://x.example/", "Retry-After": "7" },
        }),
    ],
    ["a 400", () => new Response(null, { status: 400, headers: { "Retry-After": "7" } })],
  ])("asks for no retry after %s, which a retry would meet again", async (_, answer) => {
    const res = await failing(answer);
    expect(res.status).toBe(502);
    expect(res.headers.get("Retry-After")).toBeNull();
  });

  it("answers a gallery whose listing is refused as busy 503, with its Retry-After", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(() => new Response(null, { status: 503, headers: { "Retry-After": "9" } }));
    const res = await send(`${newBase()}/`, PUBLIC);
    expect(res.status).toBe(503);
    expect(res.headers.get("Retry-After")).toBe("9");
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });
});

describe("the origin's Retry-After", () => {
  const NOW = Date.parse("2026-05-01T10:00:00Z");
  const after = (value: string) => retryAfterSeconds(new Headers({ "Retry-After": value }), NOW);

  it("reads delay-seconds", () => {
    expect(after("7")).toBe(7);
    expect(after(" 120 ")).toBe(120);
  });

  it("reads an HTTP-date as the seconds until it", () => {
    expect(after("Fri, 01 May 2026 10:00:30 GMT")).toBe(30);
    expect(after("Friday, 01-May-26 10:01:00 GMT")).toBe(60);
    expect(after("Fri May  1 10:00:45 2026")).toBe(45);
  });

  it(`holds it to 1..${MAX_RETRY_AFTER} seconds`, () => {
    expect(after("0")).toBe(1);
    expect(after("Fri, 01 May 2026 09:00:00 GMT")).toBe(1);
    expect(after("3600")).toBe(MAX_RETRY_AFTER);
    expect(after("9".repeat(400))).toBe(MAX_RETRY_AFTER);
    expect(after("Sat, 02 May 2026 10:00:00 GMT")).toBe(MAX_RETRY_AFTER);
  });

  it("falls back to the default where there is none, or none that reads", () => {
    expect(retryAfterSeconds(new Headers(), NOW)).toBe(DEFAULT_RETRY_AFTER);
    for (const value of ["", "-5", "1.5", "soon", "2026-05-01T10:00:30Z", "0x10"]) {
      expect(after(value)).toBe(DEFAULT_RETRY_AFTER);
    }
  });
});
