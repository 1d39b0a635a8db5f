import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { IMMUTABLE, NOT_FOUND_TTL } from "../src/http";
import { acceptedFormats, candidates } from "../src/negotiate";
import { sign } from "../src/signing";
import { BASE, countingBucket, newBase, newKey, send } from "./helpers";

const CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8";

/**
 * A persisted image with derivatives at `widths` (the last is its own width), and its records:
 * the metadata record, and the derivatives record listing `listed` (none when `listed` is
 * null: not derived yet). `legacy`: listed in the metadata record instead, as persist once did.
 */
async function persisted(
  widths = [256, 512, 768],
  listed: number[] | null = widths,
  legacy = false,
) {
  const key = newKey();
  const base = key.slice(0, -4);
  const [day, id] = [key.slice(0, 10), key.slice(11, -4)];
  await env.IMAGES.put(key, "png");
  const derivatives: Record<string, string> = {};
  for (const width of widths) {
    for (const format of ["avif", "webp"]) {
      await env.IMAGES.put(`${base}.w${width}.${format}`, `${format}-${width}`);
    }
  }
  for (const width of listed ?? []) {
    derivatives[`avif:${width}`] = `${base}.w${width}.avif`;
    derivatives[`webp:${width}`] = `${base}.w${width}.webp`;
  }
  const keys = { image: key, metadata: `${base}.json`, ...(legacy ? derivatives : {}) };
  await env.IMAGES.put(`${base}.json`, JSON.stringify({ persisted: { keys } }));
  if (listed !== null && !legacy) {
    const record = { derived: { keys: { record: `${base}.derivatives.json`, ...derivatives } } };
    await env.IMAGES.put(`${base}.derivatives.json`, JSON.stringify(record));
  }
  return { key, url: `${BASE}/${key}`, day, id };
}

async function body(url: string, accept?: string) {
  const res = await send(new Request(url, { headers: accept ? { Accept: accept } : {} }));
  return { res, text: await res.text() };
}

afterEach(() => {
  vi.restoreAllMocks();
  vi.useRealTimers();
});

describe("format from Accept", () => {
  it("prefers AVIF, then WebP, then the PNG, and says it varies by Accept", async () => {
    const { url } = await persisted();
    for (const [accept, text, type] of [
      [CHROME, "avif-768", "image/avif"],
      ["image/webp,*/*", "webp-768", "image/webp"],
      ["image/avif;q=0,image/webp", "webp-768", "image/webp"],
      ["image/png,image/*,*/*", "png", "image/png"],
      [undefined, "png", "image/png"],
    ] as const) {
      const { res, text: got } = await body(url, accept);
      expect(res.status).toBe(200);
      expect(got, accept).toBe(text);
      expect(res.headers.get("Content-Type")).toBe(type);
      expect(res.headers.get("Vary")).toBe("Accept");
    }
  });

  it("parses Accept strictly", () => {
    expect(acceptedFormats(CHROME)).toEqual(["avif", "webp"]);
    expect(acceptedFormats("IMAGE/WEBP; q=0.5, image/avif;q=0.0")).toEqual(["webp"]);
    expect(acceptedFormats("*/*")).toEqual([]);
    expect(acceptedFormats(null)).toEqual([]);
  });
});

describe("width from w", () => {
  it("picks the narrowest derivative at least w wide, never upscaling", async () => {
    const { url } = await persisted();
    for (const [w, text] of [
      [1, "avif-256"],
      [256, "avif-256"],
      [257, "avif-512"],
      [600, "avif-768"],
      [5000, "avif-768"],
    ] as const) {
      expect((await body(`${url}?w=${w}`, CHROME)).text, String(w)).toBe(text);
    }
    // Without a derivative format, w gives the PNG itself: nothing is resized at the edge.
    expect((await body(`${url}?w=256`, "image/png")).text).toBe("png");
  });

  it("chooses among what exists", () => {
    const available = { avif: [], webp: [100, 200] };
    expect(candidates(["avif", "webp"], 150, available)).toEqual([{ format: "webp", width: 200 }]);
    expect(candidates(["avif"], 150, available)).toEqual([]);
  });

  it.each(["0", "-1", "abc", "1.5", "08", "99999", ""])("w=%s answers 400", async (w) => {
    const { url } = await persisted();
    expect((await send(`${url}?w=${w}`)).status).toBe(400);
  });

  it("refuses w on anything but a full image", async () => {
    const { key } = await persisted();
    const avif = key.replace(".png", ".w256.avif");
    expect((await send(`${BASE}/${avif}?w=100`)).status).toBe(400);
    const direct = await body(`${BASE}/${avif}`);
    expect(direct.text).toBe("avif-256");
    expect(direct.res.headers.get("Content-Type")).toBe("image/avif");
  });

  it("believes only derivatives a record names as imagegen names them", async () => {
    const { key, day, id } = await persisted([256], null);
    await env.IMAGES.put(
      `${day}/${id}.derivatives.json`,
      JSON.stringify({ derived: { keys: { "avif:256": "2026/05/01/other.png" } } }),
    );
    expect((await body(`${BASE}/${key}`, CHROME)).text).toBe("png");
  });

  it("serves the PNG when there is no record", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "png");
    expect((await body(`${BASE}/${key}?w=300`, CHROME)).text).toBe("png");
  });

  it("reads the derivatives record once, then from the edge cache", async () => {
    const { url } = await persisted();
    const { bucket, calls } = countingBucket();
    await send(new Request(`${url}?w=300`, { headers: { Accept: CHROME } }), { IMAGES: bucket });
    await send(new Request(`${url}?w=600`, { headers: { Accept: CHROME } }), { IMAGES: bucket });
    const records = calls.filter((c) => c.key.endsWith(".json")).map((c) => c.key);
    expect(records).toEqual([url.slice(BASE.length + 1).replace(".png", ".derivatives.json")]);
  });
});

describe("before the derivatives exist", () => {
  it("serves the PNG, kept only as long as the missing record is remembered", async () => {
    const { url } = await persisted([256], null);
    const standIn = await body(url, CHROME);
    expect(standIn.text).toBe("png");
    expect(standIn.res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    expect(standIn.res.headers.get("Vary")).toBe("Accept");
    // A client that takes no derivative format gets the PNG for good.
    const plain = await body(url, "image/png");
    expect(plain.res.headers.get("Cache-Control")).toBe(IMMUTABLE);
  });

  it("holds a signed URL's stand-in no longer either", async () => {
    const { key, url } = await persisted([256], null);
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_800_000_030;
    const secret = "stand-in-signing-secret";
    const signature = await sign(key, expires, secret);
    const signed = `${url}?expires=${expires}&signature=${signature}`;
    const res = await send(new Request(signed, { headers: { Accept: CHROME } }), {
      SIGNING_SECRET: secret,
    });
    expect(await res.text()).toBe("png");
    expect(res.headers.get("Cache-Control")).toBe("private, max-age=30");
    const later = `${url}?expires=${expires + 600}&signature=${await sign(key, expires + 600, secret)}`;
    const kept = await send(new Request(later, { headers: { Accept: CHROME } }), {
      SIGNING_SECRET: secret,
    });
    expect(kept.headers.get("Cache-Control")).toBe(`private, max-age=${NOT_FOUND_TTL}`);
  });

  it("serves the full image for a thumbnail not made yet, as briefly", async () => {
    const { key } = await persisted([256], null);
    const thumbnail = key.replace(".png", ".thumb.webp");
    const standIn = await body(`${BASE}/${thumbnail}`);
    expect(standIn.res.status).toBe(200);
    expect(standIn.text).toBe("png");
    expect(standIn.res.headers.get("Content-Type")).toBe("image/png");
    expect(standIn.res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    const made = newKey("thumb");
    await env.IMAGES.put(made, "thumb");
    const served = await body(`${BASE}/${made}`);
    expect(served.text).toBe("thumb");
    expect(served.res.headers.get("Content-Type")).toBe("image/webp");
    expect(served.res.headers.get("Cache-Control")).toBe(IMMUTABLE);
  });

  it("serves the derivatives an older metadata record lists", async () => {
    const { url } = await persisted([256, 512], [256, 512], true);
    const { res, text } = await body(`${url}?w=300`, CHROME);
    expect(text).toBe("avif-512");
    expect(res.headers.get("Cache-Control")).toBe(IMMUTABLE);
  });
});

// A bucket restored from a backup keeps the derivatives records and may lack the objects they
// list (imagegen/derive.py `_remake_lost` makes them again): the canonical URL must still
// answer, with what there is, and not for long.
describe("after the derivatives are lost", () => {
  it("serves the next format that exists, then the PNG, each held briefly", async () => {
    const image = await persisted([256, 512]);
    const base = image.key.slice(0, -4);
    await env.IMAGES.delete([`${base}.w512.avif`, `${base}.w256.avif`]);
    const webp = await body(`${image.url}?w=300`, CHROME);
    expect(webp.res.status).toBe(200);
    expect(webp.text).toBe("webp-512");
    expect(webp.res.headers.get("Content-Type")).toBe("image/webp");
    expect(webp.res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    expect(webp.res.headers.get("Vary")).toBe("Accept");

    const lost = await persisted([256, 512]);
    const derivatives = [256, 512].flatMap((w) => ["avif", "webp"].map((f) => `.w${w}.${f}`));
    await env.IMAGES.delete(derivatives.map((suffix) => lost.key.replace(".png", suffix)));
    const url = lost.url;
    for (const target of [url, `${url}?w=300`]) {
      const png = await body(target, CHROME);
      expect(png.res.status, target).toBe(200);
      expect(png.text).toBe("png");
      expect(png.res.headers.get("Content-Type")).toBe("image/png");
      expect(png.res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    }
    // A range or a HEAD of the canonical URL is answered from the PNG as well.
    const head = await send(new Request(url, { method: "HEAD", headers: { Accept: CHROME } }));
    expect(head.status).toBe(200);
    expect(head.headers.get("Content-Type")).toBe("image/png");
    // Each missing object is looked up once, then remembered at the edge with the others.
    const { bucket, calls } = countingBucket();
    await send(new Request(`${url}?w=300`, { headers: { Accept: CHROME } }), { IMAGES: bucket });
    expect(calls).toEqual([]);
  });

  it("tries at most one width a format, never a narrower one than asked", () => {
    const available = { avif: [256, 512], webp: [256, 512] };
    expect(candidates(["avif", "webp"], 300, available)).toEqual([
      { format: "avif", width: 512 },
      { format: "webp", width: 512 },
    ]);
    expect(candidates(["webp"], null, available)).toEqual([{ format: "webp", width: 512 }]);
    expect(candidates(["avif"], 300, { avif: [], webp: [512] })).toEqual([]);
  });
});

/**
 * The local bucket, except that a read of a key `fault` names fails ("error") or never answers
 * ("stall"); `reads` has every key read.
 */
function faultyBucket(fault: (key: string) => "error" | "stall" | null) {
  const reads: string[] = [];
  const bucket = {
    async get(key: string, options?: R2GetOptions) {
      reads.push(key);
      const kind = fault(key);
      if (kind === "error") throw new Error("We encountered an internal error. Please try again.");
      if (kind === "stall") return new Promise<never>(() => {});
      return env.IMAGES.get(key, options);
    },
    async head(key: string) {
      reads.push(key);
      return env.IMAGES.head(key);
    },
  } as unknown as R2Bucket;
  return { bucket, reads };
}

// Choosing a format improves on the PNG and must never cost the image: a lookup that fails is
// answered as one that found nothing, briefly, and the next request looks again.
describe("when a lookup fails", () => {
  it("serves the PNG, held briefly, whichever lookup fails or times out", async () => {
    for (const [failing, kind] of [
      [".derivatives.json", "error"],
      [".derivatives.json", "stall"],
      [".w512.avif", "error"],
      [".w512.avif", "stall"],
    ] as const) {
      const what = `${failing} ${kind}`;
      const warnings = vi.spyOn(console, "warn").mockImplementation(() => {});
      const errors = vi.spyOn(console, "error").mockImplementation(() => {});
      const { url, key } = await persisted([256, 512]);
      const { bucket } = faultyBucket((k) => (k.endsWith(failing) ? kind : null));
      const config = { IMAGES: bucket, ORIGIN_TIMEOUT_MS: "100" };
      const res = await send(new Request(`${url}?w=300`, { headers: { Accept: CHROME } }), config);
      expect(res.status, what).toBe(200);
      expect(await res.text(), what).toBe("png");
      expect(res.headers.get("Content-Type")).toBe("image/png");
      expect(res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
      expect(res.headers.get("Vary")).toBe("Accept");
      // Said once, naming the image, and not as an error: the client got an image.
      expect(warnings, what).toHaveBeenCalledOnce();
      expect(String(warnings.mock.calls[0]?.[0])).toContain(key);
      expect(errors).not.toHaveBeenCalled();
      // The failure is not remembered: once the origin answers, the derivative is served.
      const healthy = await body(`${url}?w=300`, CHROME);
      expect(healthy.text, what).toBe("avif-512");
      expect(healthy.res.headers.get("Cache-Control")).toBe(IMMUTABLE);
      vi.restoreAllMocks();
    }
  });

  it("serves the PNG when the older metadata record cannot be read", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    // Listed in the metadata record, as before derivatives had a record of their own.
    const { key, url } = await persisted([256], [256], true);
    const metadata = key.replace(".png", ".json");
    const { bucket, reads } = faultyBucket((k) => (k === metadata ? "error" : null));
    const res = await send(new Request(url, { headers: { Accept: CHROME } }), { IMAGES: bucket });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe("png");
    expect(res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    expect(reads).toContain(metadata);
    expect((await body(url, CHROME)).text).toBe("avif-256");
  });

  it("serves the full image for a thumbnail that cannot be read, as briefly", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const { key } = await persisted([256], null);
    const thumbnail = key.replace(".png", ".thumb.webp");
    await env.IMAGES.put(thumbnail, "thumb");
    const { bucket } = faultyBucket((k) => (k === thumbnail ? "error" : null));
    const res = await send(`${BASE}/${thumbnail}`, { IMAGES: bucket });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe("png");
    expect(res.headers.get("Content-Type")).toBe("image/png");
    expect(res.headers.get("Cache-Control")).toBe(`public, max-age=${NOT_FOUND_TTL}`);
    expect((await body(`${BASE}/${thumbnail}`)).text).toBe("thumb");
  });

  it("answers 502 only when the image itself cannot be read", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    const { url } = await persisted([256]);
    const { bucket } = faultyBucket(() => "error");
    const res = await send(new Request(url, { headers: { Accept: CHROME } }), { IMAGES: bucket });
    expect(res.status).toBe(502);
    expect(res.headers.get("Cache-Control")).toBe("no-store");
    expect(errors).toHaveBeenCalledOnce();
  });
});

describe("signed URLs with parameters", () => {
  const SECRET = "formats-signing-secret";

  it("covers w: a changed or added width is refused", async () => {
    const { key, url } = await persisted();
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_800_000_600;
    const signature = await sign(key, expires, SECRET, { w: "300" });
    const ok = await send(
      new Request(`${url}?w=300&expires=${expires}&signature=${signature}`, {
        headers: { Accept: CHROME },
      }),
      { SIGNING_SECRET: SECRET },
    );
    expect(ok.status).toBe(200);
    expect(await ok.text()).toBe("avif-512");
    for (const query of [`w=600&`, ``, `w=300&x=1&`]) {
      const res = await send(`${url}?${query}expires=${expires}&signature=${signature}`, {
        SIGNING_SECRET: SECRET,
      });
      expect(res.status, query).toBe(403);
    }
  });
});

// The PNG answers a thumbnail URL until derive writes the thumbnail, and a `.png` URL until
// derive writes its derivatives, often within the same second: dates, to the second, cannot
// tell such objects apart, so only their ETags validate (RFC 9110 §13.1.3, §13.1.5).
describe("answers that may be another object at the same URL", () => {
  /** The time the bucket gives `key`, as a client holding a date of that second sends it. */
  async function uploaded(key: string): Promise<string> {
    const object = await env.IMAGES.head(key);
    if (object === null) throw new Error(`no ${key}`);
    return object.uploaded.toUTCString();
  }

  it("gives and honours no date on a stand-in or a derivative, only its ETag", async () => {
    const { key, day, id } = await persisted([256], null);
    const base = key.slice(0, -4);
    const standIn = await send(new Request(`${BASE}/${key}`, { headers: { Accept: CHROME } }));
    expect(await standIn.text()).toBe("png");
    expect(standIn.headers.get("Last-Modified")).toBeNull();
    expect(standIn.headers.get("ETag")).not.toBeNull();

    // derive writes the record; the client revalidates, later, with a date of that second
    const record = {
      derived: { keys: { "avif:256": `${base}.w256.avif`, "webp:256": `${base}.w256.webp` } },
    };
    await env.IMAGES.put(`${day}/${id}.derivatives.json`, JSON.stringify(record));
    const url = `${newBase()}/${key}`;
    const since = await uploaded(`${base}.w256.avif`);
    for (const attempt of ["miss", "hit"]) {
      const res = await send(
        new Request(url, { headers: { Accept: CHROME, "If-Modified-Since": since } }),
      );
      expect(res.status, attempt).toBe(200);
      expect(await res.text()).toBe("avif-256");
      expect(res.headers.get("Last-Modified")).toBeNull();
      // If-Unmodified-Since needs a date too: without one it is ignored (§13.1.4).
      const unmodified = await send(
        new Request(url, {
          headers: { Accept: CHROME, "If-Unmodified-Since": "Thu, 01 Jan 2015 00:00:00 GMT" },
        }),
      );
      expect(unmodified.status, attempt).toBe(200);
    }

    // The derivative's strong ETag still makes a 304, kept as long as the derivative.
    const avif = await send(new Request(url, { headers: { Accept: CHROME } }));
    const etag = avif.headers.get("ETag") ?? "";
    expect(etag).not.toBe(standIn.headers.get("ETag"));
    const fresh = await send(
      new Request(url, { headers: { Accept: CHROME, "If-None-Match": etag } }),
    );
    expect(fresh.status).toBe(304);
    expect(fresh.headers.get("ETag")).toBe(etag);
    expect(fresh.headers.get("Cache-Control")).toBe(IMMUTABLE);
    expect(fresh.headers.get("Last-Modified")).toBeNull();
    const stale = await send(
      new Request(url, {
        headers: { Accept: CHROME, "If-None-Match": standIn.headers.get("ETag") ?? "" },
      }),
    );
    expect(stale.status).toBe(200);
    expect(await stale.text()).toBe("avif-256");

    // A client that takes no derivative format always gets the PNG: its date validates.
    const png = await send(new Request(url, { headers: { Accept: "image/png" } }));
    const modified = png.headers.get("Last-Modified") ?? "";
    expect(modified).toBe(await uploaded(key));
    const notModified = await send(
      new Request(url, { headers: { Accept: "image/png", "If-Modified-Since": modified } }),
    );
    expect(notModified.status).toBe(304);
  });

  it("cuts no range by a date from a thumbnail URL, only by its ETag", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "PNGDATA-PNGDATA");
    const thumbnail = key.replace(".png", ".thumb.webp");
    const standIn = await send(`${newBase()}/${thumbnail}`);
    expect(await standIn.text()).toBe("PNGDATA-PNGDATA");
    expect(standIn.headers.get("Last-Modified")).toBeNull();

    await env.IMAGES.put(thumbnail, "WEBPDATA-WEBPDATA");
    // A download of the stand-in resumed with a date of the second both were written in.
    const date = await uploaded(thumbnail);
    for (const ifRange of [date, await uploaded(key)]) {
      for (const url of [`${newBase()}/${thumbnail}`, `${BASE}/${thumbnail}`]) {
        const res = await send(
          new Request(url, { headers: { Range: "bytes=7-", "If-Range": ifRange } }),
        );
        expect(res.status, url).toBe(200);
        expect(await res.text()).toBe("WEBPDATA-WEBPDATA");
        expect(res.headers.get("Content-Range")).toBeNull();
      }
    }
    const made = await send(`${BASE}/${thumbnail}`);
    expect(made.headers.get("Last-Modified")).toBeNull();
    const etag = made.headers.get("ETag") ?? "";
    const resumed = await send(
      new Request(`${BASE}/${thumbnail}`, { headers: { Range: "bytes=8-", "If-Range": etag } }),
    );
    expect(resumed.status).toBe(206);
    expect(await resumed.text()).toBe("-WEBPDATA");
    const revalidated = await send(
      new Request(`${newBase()}/${thumbnail}`, {
        headers: { "If-None-Match": etag, "If-Modified-Since": "Thu, 01 Jan 2015 00:00:00 GMT" },
      }),
    );
    expect(revalidated.status).toBe(304);
    const ims = await send(
      new Request(`${newBase()}/${thumbnail}`, { headers: { "If-Modified-Since": date } }),
    );
    expect(ims.status).toBe(200);
  });

  it("cuts no range of a derivative by a date", async () => {
    const { key } = await persisted([256]);
    const date = await uploaded(key.replace(".png", ".w256.avif"));
    const url = `${newBase()}/${key}`;
    for (const attempt of ["miss", "hit"]) {
      const res = await send(
        new Request(url, { headers: { Accept: CHROME, Range: "bytes=5-", "If-Range": date } }),
      );
      expect(res.status, attempt).toBe(200);
      expect(await res.text()).toBe("avif-256");
    }
  });
});
