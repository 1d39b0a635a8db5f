/**
 * Serving one object key: edge cache first, then the origin, reading no more than needed.
 *
 * - A hit answers everything (412, 304, 206, HEAD) from the stored full object.
 * - A miss for a HEAD, a range or a conditional request is passed to the origin as it is
 *   (R2 `head`/`get(key, {range, onlyIf})`, S3 `HEAD`/`Range`/`If-None-Match`/
 *   `If-Modified-Since`) and not cached; the preconditions are judged against the metadata the
 *   origin answers with, as against a hit.
 * - A miss for a plain GET reads the whole object once per key and isolate, however many
 *   requests wait for it (they share its bytes), and stores it in the edge cache; a missing key
 *   is stored as a 404 for NOT_FOUND_TTL seconds (not a HEAD's 403: see DENIED_HEAD).
 */
import type { Config } from "./config";
import {
  answer,
  notFoundMarker,
  objectHeaders,
  parseHttpDate,
  passedThrough,
  textResponse,
} from "./http";
import {
  DENIED_HEAD,
  type ReadOptions,
  type ReadRange,
  readObject,
  readWholeObject,
} from "./origins";

/** Where a request is served: configuration, its context, and the base of cache keys. */
export interface Serving {
  config: Config;
  ctx: ExecutionContext;
  cacheBase: string;
}

interface Whole {
  headers: [string, string][];
  body: ArrayBuffer;
}

// Reads in flight in this isolate, by cache key. Only plain data crosses requests (never a
// stream), so a waiting request does no I/O on behalf of the one that started the read.
const inflight = new Map<string, Promise<Whole | null>>();

function cacheKey(serving: Serving, key: string): Request {
  // The path alone: every signature and parameter of one key shares one entry.
  return new Request(`${serving.cacheBase}/${key}`, { method: "GET" });
}

async function readWhole(config: Config, key: string): Promise<Whole | null> {
  // Headers and body under one ORIGIN_TIMEOUT_MS: the read always settles, so a stalled body
  // never holds the in-flight entry (and every later request for the key) forever.
  const read = await readWholeObject(config, key);
  if (read === null) return null;
  const headers = objectHeaders(read.object, key);
  headers.set("Content-Length", String(read.body.byteLength));
  return { headers: [...headers], body: read.body };
}

/**
 * The whole object at `key` (from the edge cache or the origin), or null when there is none.
 *
 * Throws OriginError when the origin fails.
 */
export async function wholeObject(serving: Serving, key: string): Promise<Response | null> {
  const cache = caches.default;
  const entry = cacheKey(serving, key);
  const hit = await cache.match(entry);
  if (hit !== undefined) {
    if (hit.status === 404) {
      await hit.body?.cancel();
      return null;
    }
    return hit;
  }
  let pending = inflight.get(entry.url);
  if (pending === undefined) {
    // Settled in every case (readWhole is bounded by the origin timeout), and removed then, so
    // the request after a failure asks the origin again.
    pending = readWhole(serving.config, key);
    inflight.set(entry.url, pending);
    // The starting request stays alive until the read is stored, whoever else waits for it.
    // The read stays in flight until then: a request in between (the thumbnail, served right
    // after its existence was checked) takes it instead of reading the origin again.
    serving.ctx.waitUntil(
      pending
        .catch(() => undefined) // an origin failure is answered to the client, not stored
        .then((whole) =>
          whole === undefined
            ? undefined
            : cache.put(
                entry,
                whole === null
                  ? notFoundMarker()
                  : new Response(whole.body, { headers: whole.headers }),
              ),
        )
        .catch((err: unknown) => {
          console.warn(`edge cache put failed for ${key}: ${(err as Error)?.name ?? "error"}`);
        })
        .finally(() => inflight.delete(entry.url)),
    );
  }
  const whole = await pending;
  if (whole === null) return null;
  // Every waiter (and the edge cache's copy) reads the same bytes, never a copy of its own: an
  // isolate answers many requests at once within 128 MB. workerd takes a BufferSource body by
  // reference, neither copying nor detaching it (src/workerd/api/http.c++
  // `Body::extractBody`: "The spec would have us create a copy of the input buffer here, but
  // that would be a sad waste"), so one response read to the end leaves the others whole.
  return new Response(new Uint8Array(whole.body), { status: 200, headers: whole.headers });
}

/**
 * Whether the object at `key` exists, by the same cached, coalesced read as wholeObject: a
 * request that serves it next takes that read, and a missing key is remembered at the edge for
 * NOT_FOUND_TTL seconds, so a check costs the origin at most one read a key.
 *
 * Throws OriginError when the origin fails.
 */
export async function objectExists(serving: Serving, key: string): Promise<boolean> {
  const whole = await wholeObject(serving, key);
  await whole?.body?.cancel();
  return whole !== null;
}

/**
 * The value of `compute()`, kept in the edge cache under `name` for `maxAge` seconds and shared
 * meanwhile by every request of this data centre: for what the Worker derives from many origin
 * reads (the gallery's listings). `name` is a path no object key can take.
 */
export async function cachedJson<T>(
  serving: Serving,
  name: string,
  maxAge: number,
  compute: () => Promise<T>,
): Promise<T> {
  const cache = caches.default;
  const entry = new Request(`${serving.cacheBase}/${name}`, { method: "GET" });
  const hit = await cache.match(entry);
  if (hit !== undefined) return (await hit.json()) as T;
  const value = await compute();
  const stored = new Response(JSON.stringify(value), {
    headers: { "Content-Type": "application/json", "Cache-Control": `public, max-age=${maxAge}` },
  });
  serving.ctx.waitUntil(
    cache.put(entry, stored).catch((err: unknown) => {
      console.warn(`edge cache put failed for ${name}: ${(err as Error)?.name ?? "error"}`);
    }),
  );
  return value;
}

// A position past Number.MAX_SAFE_INTEGER (8 PiB) loses digits as a number, and 400 digits
// make Infinity: "bytes=0-Infinity" is no range an S3 origin reads, and it sent the whole
// object (200) where R2 and a cache hit answer 206. No object is that large (S3's limit is
// 5 TB), so such a last position is the object's end and such a suffix the whole object; such
// a first position is asked as Number.MAX_SAFE_INTEGER, past the end of any object, which the
// origin answers 416 as it does any first position past the end (parseRange, on a hit, alike).
const SAFE_LIMIT = BigInt(Number.MAX_SAFE_INTEGER);

/** The single byte range of a `Range` header the origin can be asked for, or null. */
function originRange(header: string | null): ReadRange | null {
  const match = header === null ? null : /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (match === null) return null;
  const [, first = "", last = ""] = match;
  if (first === "" && last === "") return null;
  if (first === "") {
    const suffix = BigInt(last);
    if (suffix === 0n) return null;
    return suffix > SAFE_LIMIT ? { offset: 0 } : { suffix: Number(suffix) };
  }
  const start = BigInt(first);
  if (last !== "" && BigInt(last) < start) return null;
  if (start > SAFE_LIMIT) return { offset: Number.MAX_SAFE_INTEGER };
  if (last === "" || BigInt(last) > SAFE_LIMIT) return { offset: Number(start) };
  return { offset: Number(start), length: Number(BigInt(last) - start + 1n) };
}

/** What of a cache miss can go to the origin as asked, or null for a plain GET. */
// RFC 9110 §8.8.3: "*", or entity-tags (W/ optional, quoted, no '"' inside), comma-separated.
const ENTITY_TAG_LIST =
  /^\s*(?:\*|(?:W\/)?"[\x21\x23-\x7e\x80-\xff]*"(?:\s*,\s*(?:W\/)?"[\x21\x23-\x7e\x80-\xff]*")*)\s*$/;

function passThroughOptions(request: Request): ReadOptions | null {
  const headers = request.headers;
  // If-Range needs the validators first, and an origin answering a condition whole would not
  // cut the range it holds for: such a request takes the whole-object path, as on a hit.
  if (headers.has("If-Range") && headers.has("Range") && request.method !== "HEAD") return null;
  const options: ReadOptions = {};
  if (request.method === "HEAD") options.head = true;
  const ifNoneMatch = headers.get("If-None-Match");
  const since = parseHttpDate(headers.get("If-Modified-Since"));
  // Only validators the origin can read: R2 throws on an entity-tag that is not one, and a
  // condition that is no valid field value is ignored (RFC 9110 §13.1.2, §13.1.3).
  if (ifNoneMatch !== null && ENTITY_TAG_LIST.test(ifNoneMatch)) options.ifNoneMatch = ifNoneMatch;
  else if (ifNoneMatch === null && since !== null && since >= 0) {
    // A date before 1970 can never make a 304 (every object was stored since), and workerd's R2
    // binding keeps it as an unsigned count of ms (src/workerd/api/r2-bucket.c++, initOnlyIf):
    // it wrapped around to the far future, and R2 answered 304 for any object. It is sent as
    // the instant the Worker read, in IMF-fixdate, so the origin judges what a hit judges.
    options.ifModifiedSince = new Date(since).toUTCString();
  }
  // If-Match and If-Unmodified-Since (412) stay here: they are judged against the metadata the
  // origin answers with (passedThrough), as on a hit, for every kind of origin alike.
  const range = originRange(headers.get("Range"));
  if (range !== null && !options.head) options.range = range;
  return Object.keys(options).length > 0 ? options : null;
}

/**
 * The answer to `request` for the object at `key`.
 *
 * @param cacheControl The policy for this client (immutable, or private for signed URLs).
 * @throws OriginError when the origin fails.
 */
export async function serveObject(
  request: Request,
  serving: Serving,
  key: string,
  cacheControl: string,
): Promise<Response> {
  const cache = caches.default;
  const entry = cacheKey(serving, key);
  const options = passThroughOptions(request);
  if (options !== null) {
    const hit = await cache.match(entry);
    if (hit !== undefined) {
      if (hit.status === 404) return textResponse(404, "Not Found");
      return answer(request, hit, cacheControl);
    }
    if (inflight.has(entry.url)) {
      // The whole object is being read already: cut this answer from it, as from a hit.
      const whole = await wholeObject(serving, key);
      if (whole === null) return textResponse(404, "Not Found");
      return answer(request, whole, cacheControl);
    }
    const object = await readObject(serving.config, key, options);
    // A HEAD's 403 may be a refusal, not a miss: a 404 to this HEAD, and nothing stored, so a
    // GET of the key reads the origin's code (a 502 for wrong credentials).
    if (object === DENIED_HEAD) return textResponse(404, "Not Found");
    if (object === null) {
      serving.ctx.waitUntil(cache.put(entry, notFoundMarker()).catch(() => undefined));
      return textResponse(404, "Not Found");
    }
    const passed = passedThrough(request, object, key, cacheControl);
    if (passed !== null) return passed;
    // The origin answered 304 where its own metadata says modified (see passedThrough): the
    // answer comes from the whole object, as for a plain GET.
  }
  const whole = await wholeObject(serving, key);
  if (whole === null) return textResponse(404, "Not Found");
  return answer(request, whole, cacheControl);
}
