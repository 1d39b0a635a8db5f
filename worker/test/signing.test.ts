import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import shared from "../../schemas/signed-url-vectors.json";
import { IMAGE_GRACE } from "../src/gallery";
import { sign, verify } from "../src/signing";
import { BASE, countingBucket, newBase, newKey, send } from "./helpers";

interface Vector {
  name: string;
  secret: string;
  key: string;
  expires: number;
  now: number;
  signature: string;
  valid: boolean;
  url: string;
  params: Record<string, string>;
}

const vectors = shared.vectors as unknown as Vector[];
const SECRET = "worker-test-secret";

function at(unixSeconds: number): void {
  vi.useFakeTimers({ toFake: ["Date"] });
  vi.setSystemTime(unixSeconds * 1000);
}

async function signedUrl(key: string, expires: number, secret = SECRET): Promise<string> {
  return `${BASE}/${key}?expires=${expires}&signature=${await sign(key, expires, secret)}`;
}

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

describe("shared vectors", () => {
  it("use the base URL of the Worker tests", () => {
    expect(shared.base_url).toBe(BASE);
    expect(vectors.some((v) => v.valid)).toBe(true);
    expect(vectors.some((v) => !v.valid)).toBe(true);
  });

  it.each(vectors.map((v) => [v.name, v] as const))("verify: %s", async (_, v) => {
    expect(await verify(v.key, v.expires, v.signature, v.secret, v.now, v.params)).toBe(v.valid);
  });

  it.each(vectors.filter((v) => v.valid).map((v) => [v.name, v] as const))(
    "sign: %s",
    async (_, v) => {
      expect(await sign(v.key, v.expires, v.secret, v.params)).toBe(v.signature);
    },
  );

  it.each(vectors.map((v) => [v.name, v] as const))("request: %s", async (_, v) => {
    const gallery = v.key === "" || v.key.endsWith("/");
    if (!gallery) await env.IMAGES.put(v.key, "image");
    at(v.now);
    const res = await send(v.url, { SIGNING_SECRET: v.secret, GALLERY: "signed" });
    if (v.valid) {
      expect(res.status).toBe(200);
      const maxAge = gallery ? 60 : v.expires - v.now;
      expect(res.headers.get("Cache-Control")).toBe(`private, max-age=${maxAge}`);
    } else {
      expect(res.status).toBe(403);
      if (gallery) {
        // The gallery answers a page, under its own policy.
        expect(res.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
        expect(await res.text()).toContain(v.now > v.expires ? "expired" : "<h1>Forbidden</h1>");
      } else {
        expect(await res.text()).toBe("Forbidden\n");
      }
    }
  });
});

describe("when SIGNING_SECRET is set", () => {
  const NOW = 1_800_000_000;

  it("serves a valid signed URL with a private lifetime", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    at(NOW);
    const res = await send(await signedUrl(key, NOW + 600), { SIGNING_SECRET: SECRET });
    expect(res.status).toBe(200);
    expect(res.headers.get("Cache-Control")).toBe("private, max-age=600");
  });

  it.each([
    ["no query", (url: string) => url.split("?")[0] ?? ""],
    ["no signature", (url: string) => url.replace(/&signature=.*/, "")],
    ["no expires", (url: string) => url.replace(/expires=\d+&/, "")],
    ["a repeated signature", (url: string) => `${url}&signature=${"0".repeat(64)}`],
    ["a repeated expires", (url: string) => url.replace("?", "?expires=1&")],
    ["a non-numeric expires", (url: string) => url.replace(/expires=\d+/, "expires=soon")],
    ["a negative expires", (url: string) => url.replace(/expires=\d+/, "expires=-1")],
    ["a signature for another key", (url: string) => url.replace(/gen_[^.]+/, "gen_other")],
    ["an extended expiry", (url: string) => url.replace(/expires=\d+/, `expires=${NOW + 7200}`)],
  ])("answers 403 to %s without reaching the origin", async (_, tamper) => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    const { bucket, gets } = countingBucket();
    at(NOW);
    const url = tamper(await signedUrl(key, NOW + 600));
    const res = await send(url, { SIGNING_SECRET: SECRET, IMAGES: bucket });
    expect(res.status).toBe(403);
    expect(gets()).toBe(0);
  });

  it("answers 403 once the URL has expired, even from the edge cache", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    const url = await signedUrl(key, NOW);
    at(NOW);
    expect((await send(url, { SIGNING_SECRET: SECRET })).status).toBe(200);
    at(NOW + 1);
    expect((await send(url, { SIGNING_SECRET: SECRET })).status).toBe(403);
  });

  it("shares one cache entry between signatures of the same key", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    const { bucket, gets } = countingBucket();
    at(NOW);
    for (const expires of [NOW + 60, NOW + 120, NOW + 3600]) {
      const res = await send(await signedUrl(key, expires), {
        SIGNING_SECRET: SECRET,
        IMAGES: bucket,
      });
      expect(res.status).toBe(200);
      expect(res.headers.get("Cache-Control")).toBe(`private, max-age=${expires - NOW}`);
    }
    expect(gets()).toBe(1);
  });

  it("still answers 404 to a path that is not a key, and 304 with a private lifetime", async () => {
    at(NOW);
    const json = "2026/05/01/abc.json";
    expect((await send(await signedUrl(json, NOW + 60), { SIGNING_SECRET: SECRET })).status).toBe(
      404,
    );

    const key = newKey();
    const object = await env.IMAGES.put(key, "image");
    const res = await send(
      new Request(await signedUrl(key, NOW + 60), {
        headers: { "If-None-Match": object?.httpEtag ?? "" },
      }),
      { SIGNING_SECRET: SECRET },
    );
    expect(res.status).toBe(304);
    expect(res.headers.get("Cache-Control")).toBe("private, max-age=60");
  });
});

describe("rotating the secret", () => {
  const NOW = 1_800_000_000;
  const OLD = "worker-test-secret-old";
  const ROTATING = { SIGNING_SECRET: SECRET, SIGNING_SECRET_PREVIOUS: OLD };

  it("accepts URLs signed with SIGNING_SECRET_PREVIOUS, and with SIGNING_SECRET", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    at(NOW);
    for (const secret of [OLD, SECRET]) {
      const res = await send(await signedUrl(key, NOW + 600, secret), ROTATING);
      expect(res.status, secret).toBe(200);
      expect(res.headers.get("Cache-Control")).toBe("private, max-age=600");
    }
    // Any other secret, an expired URL, and the previous secret once it is removed: 403.
    expect((await send(await signedUrl(key, NOW + 600, "other"), ROTATING)).status).toBe(403);
    expect((await send(await signedUrl(key, NOW - 1, OLD), ROTATING)).status).toBe(403);
    const removed = await send(await signedUrl(key, NOW + 600, OLD), { SIGNING_SECRET: SECRET });
    expect(removed.status).toBe(403);
  });

  it("signs the gallery's links with SIGNING_SECRET only", async () => {
    const day = "1999/01/01/";
    await env.IMAGES.put(`${day}rotated.png`, "png");
    await env.IMAGES.put(`${day}rotated.json`, JSON.stringify({ persisted: { prompt: "p" } }));
    at(NOW);
    const link = `${newBase()}/${day}?expires=${NOW + 600}&signature=${await sign(day, NOW + 600, OLD)}`;
    const res = await send(link, { ...ROTATING, GALLERY: "signed" });
    expect(res.status).toBe(200);
    const image = `${day}rotated.png`;
    const until = NOW + 600 + IMAGE_GRACE;
    expect(await res.text()).toContain(
      `/${image}?expires=${until}&amp;signature=${await sign(image, until, SECRET)}`,
    );
  });

  it("refuses SIGNING_SECRET_PREVIOUS without SIGNING_SECRET: the images would be public", async () => {
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    const res = await send(`${BASE}/${newKey()}`, { SIGNING_SECRET_PREVIOUS: OLD });
    expect(res.status).toBe(500);
    expect(errors.mock.calls.join(" ")).toContain("SIGNING_SECRET_PREVIOUS");
    expect(errors.mock.calls.join(" ")).not.toContain(OLD);
  });
});

describe("a signing secret that signs nothing safely", () => {
  // 15 bytes as UTF-8 in 8 characters: the length is counted in bytes, as HMAC sees the key.
  const SHORT = "é".repeat(7) + "a";
  const refused: [string, string, string][] = [
    ["empty", "", "is empty"],
    ["blank", " ".repeat(20), "begins or ends with whitespace"],
    ["a trailing newline", `${SECRET}\n`, "begins or ends with whitespace"],
    ["a leading space", ` ${SECRET}`, "begins or ends with whitespace"],
    ["7 bytes", "hunter2", "is shorter than 16 bytes"],
    ["15 bytes", SHORT, "is shorter than 16 bytes"],
  ];

  it.each(refused)(
    "answers 500 to every request when SIGNING_SECRET is %s, never serving an image",
    async (_, secret, said) => {
      const key = newKey();
      await env.IMAGES.put(key, "image");
      const { bucket, gets } = countingBucket();
      const errors = vi.spyOn(console, "error").mockImplementation(() => {});
      for (const url of [`${BASE}/${key}`, await signedUrl(key, 1_800_000_000), `${BASE}/`]) {
        const res = await send(url, { SIGNING_SECRET: secret, IMAGES: bucket });
        expect(res.status).toBe(500);
        expect(res.headers.get("Cache-Control")).toBe("no-store");
        expect(await res.text()).toBe("Server Misconfigured\n");
      }
      expect(gets()).toBe(0);
      expect(errors.mock.calls.join(" ")).toContain(`SIGNING_SECRET ${said}`);
      if (secret.trim()) expect(errors.mock.calls.join(" ")).not.toContain(secret.trim());
    },
  );

  it.each(refused)(
    "answers 500 when SIGNING_SECRET_PREVIOUS is %s, as a misconfiguration",
    async (_, previous, said) => {
      const errors = vi.spyOn(console, "error").mockImplementation(() => {});
      const key = newKey();
      at(1_800_000_000);
      const res = await send(await signedUrl(key, 1_800_000_600), {
        SIGNING_SECRET: SECRET,
        SIGNING_SECRET_PREVIOUS: previous,
      });
      expect(res.status).toBe(500);
      expect(res.headers.get("Cache-Control")).toBe("no-store");
      expect(errors.mock.calls.join(" ")).toContain(`SIGNING_SECRET_PREVIOUS ${said}`);
    },
  );

  it("takes a secret of 16 bytes, counted as UTF-8", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    at(1_800_000_000);
    for (const secret of ["0123456789abcdef", "é".repeat(8)]) {
      const url = await signedUrl(key, 1_800_000_600, secret);
      expect((await send(url, { SIGNING_SECRET: secret })).status).toBe(200);
      expect((await send(`${BASE}/${key}`, { SIGNING_SECRET: secret })).status).toBe(403);
    }
  });
});

describe("when SIGNING_SECRET is not set", () => {
  it("needs no signature and ignores one", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "image");
    expect((await send(`${BASE}/${key}`)).status).toBe(200);
    const res = await send(`${BASE}/${key}?expires=1&signature=bad`);
    expect(res.status).toBe(200);
    expect(res.headers.get("Cache-Control")).toBe("public, max-age=31536000, immutable");
  });
});
