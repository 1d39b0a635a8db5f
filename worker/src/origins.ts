/**
 * Reading from the configured origin: an R2 binding, an S3-compatible bucket (SigV4 through
 * aws4fetch) or a public bucket URL.
 *
 * A read may be a HEAD (no body), carry a byte range and the client's validators, so that a
 * cache miss costs the origin only what the client asked for. Every read is bounded by
 * ORIGIN_TIMEOUT_MS: a whole-object read (the one that fills the edge cache) with its body, a
 * passed-through read up to its headers (its body streams to the client as it comes). Only the fields the Worker needs are kept from the origin's answer, so no
 * origin header (and no credential) is ever passed on to a client.
 */
import { AwsClient } from "aws4fetch";
import type { Config } from "./config";
import { parseHttpDate } from "./http";

/** What the origin says about an object, with or without its bytes. */
export interface OriginObject {
  /** The bytes asked for (all, or the range); null for HEAD and 304. */
  body: ReadableStream | null;
  /** Size of the whole object in bytes, when the origin says. */
  size: number | null;
  /** The entity tag, quoted as in an HTTP header. */
  etag: string | null;
  lastModified: Date | null;
  /** 200 whole object, 206 a range of it, 304 not modified, 416 range outside it. */
  status: 200 | 206 | 304 | 416;
  /** First and last byte of a 206 body. */
  range: { start: number; end: number } | null;
}

/**
 * A byte range to read: from `offset` (`length` bytes, or to the end), or the last `suffix`.
 * Every number is a safe integer, which `rangeHeader` writes in digits (a larger one would be
 * written rounded, or as "Infinity", which no origin reads).
 */
export type ReadRange = { offset: number; length?: number } | { suffix: number };

export interface ReadOptions {
  head?: boolean;
  range?: ReadRange;
  ifNoneMatch?: string;
  ifModifiedSince?: string;
}

/**
 * The origin could not answer: "timeout" maps to 504, "busy" (the origin's 429 or 503) to 503,
 * "unavailable" to 502. `retryAfter` is the seconds a client may try again after where the
 * failure is transient (no answer in time, a network error, the origin's 408, 429 or 5xx), null
 * where trying again would meet the same answer (a 403: credentials or bucket policy; a 3xx: a
 * misplaced base URL; an answer that makes no sense).
 */
export class OriginError extends Error {
  override name = "OriginError";
  constructor(
    readonly kind: "timeout" | "busy" | "unavailable",
    message: string,
    readonly retryAfter: number | null = null,
  ) {
    super(message);
  }
}

/** Seconds a client is asked to wait after a transient failure the origin gave no time for. */
export const DEFAULT_RETRY_AFTER = 5;
/**
 * The longest wait passed on from the origin's Retry-After, in seconds: the origin's estimate
 * for its own clients (a maintenance window of hours), where an image is asked for again soon.
 */
export const MAX_RETRY_AFTER = 300;

/**
 * The origin's `Retry-After` (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) as seconds from
 * `now`, held to 1..MAX_RETRY_AFTER (a date past or a 0 gives 1: a client retrying at once
 * would meet the same failure); DEFAULT_RETRY_AFTER where it sent none, or none that reads.
 */
export function retryAfterSeconds(headers: Headers, now: number = Date.now()): number {
  const value = headers.get("Retry-After")?.trim() ?? "";
  let seconds: number | null = null;
  if (/^[0-9]+$/.test(value)) seconds = Number(value);
  else {
    const time = parseHttpDate(value, now);
    if (time !== null) seconds = Math.ceil((time - now) / 1000);
  }
  if (seconds === null) return DEFAULT_RETRY_AFTER;
  return Math.min(MAX_RETRY_AFTER, Math.max(1, seconds));
}

/**
 * The OriginError for an answer the Worker cannot use (its body is given up). The origin's 429
 * (RFC 6585 §4: too many requests) and 503 (RFC 9110 §15.6.4: overloaded or down for a while)
 * say the store is busy, which the client is told as 503 ("busy"). Any other 5xx or a 408 is
 * a failure that may pass (502, with a Retry-After). Anything else (a 403, a 3xx, another 4xx)
 * will not pass by itself: 502 without one.
 */
function failure(response: Response, what: string): OriginError {
  const status = response.status;
  void response.body?.cancel();
  const message = `${what} answered ${status}`;
  if (status === 429 || status === 503) {
    return new OriginError("busy", message, retryAfterSeconds(response.headers));
  }
  if (status >= 500 || status === 408) {
    return new OriginError("unavailable", message, retryAfterSeconds(response.headers));
  }
  return new OriginError("unavailable", message);
}

// SigV4 GETs are idempotent: retry 5xx and 429 a couple of times inside the timeout.
const S3_RETRIES = 2;

function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}

export async function withTimeout<T>(
  timeoutMs: number,
  run: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    // The race also bounds reads that take no signal (the R2 binding).
    return await Promise.race([run(controller.signal), aborted(controller.signal)]);
  } catch (err) {
    if (controller.signal.aborted) {
      throw new OriginError("timeout", `no answer within ${timeoutMs} ms`, DEFAULT_RETRY_AFTER);
    }
    if (err instanceof OriginError) throw err;
    // A network error, an R2 binding that failed, a body cut off midway.
    throw new OriginError(
      "unavailable",
      `request failed (${(err as Error)?.name ?? "error"})`,
      DEFAULT_RETRY_AFTER,
    );
  } finally {
    clearTimeout(timer);
  }
}

function parseDate(value: string | null): Date | null {
  if (value === null) return null;
  const time = Date.parse(value);
  return Number.isNaN(time) ? null : new Date(time);
}

function rangeHeader(range: ReadRange): string {
  if ("suffix" in range) return `bytes=-${range.suffix}`;
  const end = range.length === undefined ? "" : String(range.offset + range.length - 1);
  return `bytes=${range.offset}-${end}`;
}

function fromHttp(response: Response): OriginObject | null {
  const status = response.status;
  if (status === 404) {
    void response.body?.cancel();
    return null;
  }
  if (![200, 206, 304, 416].includes(status)) {
    // A 403 left here means credentials or bucket policy are wrong, a 3xx a misplaced base URL.
    throw failure(response, "origin");
  }
  const headers = response.headers;
  const length = headers.get("Content-Length");
  let size = length !== null && /^\d+$/.test(length) ? Number(length) : null;
  let range: OriginObject["range"] = null;
  const contentRange = /^bytes (?:(\d+)-(\d+)|\*)\/(\d+)$/.exec(headers.get("Content-Range") ?? "");
  if (status === 206 || status === 416) {
    if (contentRange === null) throw new OriginError("unavailable", "origin range unclear");
    size = Number(contentRange[3]);
    if (status === 206) range = { start: Number(contentRange[1]), end: Number(contentRange[2]) };
  }
  const hasBody = status === 200 || status === 206;
  if (!hasBody) void response.body?.cancel();
  return {
    body: hasBody ? response.body : null,
    size: status === 304 ? null : size,
    etag: headers.get("ETag"),
    lastModified: parseDate(headers.get("Last-Modified")),
    status: status as OriginObject["status"],
    range,
  };
}

/** Whether `range` holds a byte of an object of `size` bytes (RFC 9110 §14.1.2). */
function satisfiable(range: ReadRange, size: number): boolean {
  return "suffix" in range ? range.suffix > 0 && size > 0 : range.offset < size;
}

async function fromR2(bucket: R2Bucket, key: string, options: ReadOptions) {
  if (options.head) {
    // R2's head takes no onlyIf: the client's validators are checked against these headers
    // by the caller (passedThrough), as for a cache hit.
    const object = await bucket.head(key);
    return object === null ? null : r2Object(object, null, 200);
  }
  const onlyIf = new Headers();
  if (options.ifNoneMatch) onlyIf.set("If-None-Match", options.ifNoneMatch);
  if (options.ifModifiedSince) onlyIf.set("If-Modified-Since", options.ifModifiedSince);
  let object: R2Object | R2ObjectBody | null;
  try {
    object = await bucket.get(key, { onlyIf, ...(options.range ? { range: options.range } : {}) });
  } catch (err) {
    // R2 refuses a range outside the object, and not always with an error that says so:
    // miniflare's validator throws InvalidRange when the offset is past the end, but a range
    // starting exactly at the end with a length passes it and fails an assertion on the empty
    // read (miniflare src/workers/r2/validator.worker.ts `range`, bucket.worker.ts `#get`).
    // Whether the range was the cause is decided here, from the object's size.
    if (options.range === undefined) throw err;
    const head = await bucket.head(key);
    if (head === null) return null;
    if (!satisfiable(options.range, head.size)) return r2Object(head, null, 416);
    throw err;
  }
  if (object === null) return null;
  // R2 answers a failed precondition with the object's metadata and no body.
  if (!("body" in object)) return r2Object(object, null, 304);
  if (options.range && !satisfiable(options.range, object.size)) {
    void object.body.cancel();
    return r2Object(object, null, 416);
  }
  const range = object.range as { offset?: number; length?: number } | undefined;
  if (options.range && range !== undefined) {
    const start = range.offset ?? 0;
    const length = range.length ?? object.size - start;
    return r2Object(object, object.body, 206, { start, end: start + length - 1 });
  }
  return r2Object(object, object.body, 200);
}

function r2Object(
  object: R2Object,
  body: ReadableStream | null,
  status: OriginObject["status"],
  range: OriginObject["range"] = null,
): OriginObject {
  return {
    body,
    size: object.size,
    etag: object.httpEtag,
    lastModified: object.uploaded,
    status,
    range,
  };
}

function httpHeaders(options: ReadOptions): Headers {
  const headers = new Headers();
  if (options.range) headers.set("Range", rangeHeader(options.range));
  if (options.ifNoneMatch) headers.set("If-None-Match", options.ifNoneMatch);
  if (options.ifModifiedSince) headers.set("If-Modified-Since", options.ifModifiedSince);
  return headers;
}

function s3Client(config: Config): AwsClient {
  if (config.origin.kind !== "s3") throw new Error("not an S3 origin");
  return new AwsClient({
    accessKeyId: config.origin.accessKeyId,
    secretAccessKey: config.origin.secretAccessKey,
    service: "s3",
    region: config.origin.region,
    retries: S3_RETRIES,
  });
}

// Amazon S3 answers 403 AccessDenied, not 404, for a key that does not exist when the caller may
// not list the bucket: "If you don't have the s3:ListBucket permission, Amazon S3 returns an HTTP
// status code 403 Access Denied error" (docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
// and API_HeadObject.html, "Permissions"). The usual public-read bucket policy and least-privilege
// keys grant s3:GetObject alone. Wrong credentials answer 403 with another code
// (InvalidAccessKeyId, SignatureDoesNotMatch: .../API/ErrorResponses.html) and stay failures. A
// HEAD answer has no body to tell them apart: its 403 answers the client 404 too, but as
// DENIED_HEAD, a miss that is not remembered.
let deniedLogged = false;

/**
 * What a HEAD answered 403 reads as: nothing to serve, but not known to be missing. S3 sends a
 * HEAD's error without its body (API_HeadObject.html), so a missing key in a bucket that may not
 * be listed and a refused request (wrong credentials, a skewed clock) look alike; the GET that
 * follows reads the code and gets its own answer.
 */
export const DENIED_HEAD = "denied-head";

async function deniedAsMissing(response: Response, kind: string, head: boolean): Promise<boolean> {
  if (head) void response.body?.cancel();
  const text = head ? "" : await response.text().catch(() => "");
  const code = /<Code>([^<]*)<\/Code>/.exec(text)?.[1];
  if (!head && code !== "AccessDenied") return false;
  if (!deniedLogged) {
    deniedLogged = true;
    console.warn(
      `origin ${kind} answered 403${head ? " to a HEAD" : " AccessDenied"}: read as a missing ` +
        "key (a bucket that does not grant s3:ListBucket answers so for keys that do not " +
        "exist); if every image is missing, check that s3:GetObject is granted",
    );
  }
  return true;
}

async function originRead(
  config: Config,
  key: string,
  options: ReadOptions,
  signal: AbortSignal,
): Promise<OriginObject | null | typeof DENIED_HEAD> {
  const objectKey = config.prefix + key;
  const origin = config.origin;
  const init: RequestInit = {
    method: options.head ? "HEAD" : "GET",
    headers: httpHeaders(options),
    redirect: "manual",
    signal,
  };
  if (origin.kind === "r2") return fromR2(origin.bucket, objectKey, options);
  const send = (request: RequestInit) =>
    origin.kind === "s3"
      ? s3Client(config).fetch(`${origin.endpoint}/${origin.bucket}/${objectKey}`, request)
      : fetch(`${origin.baseUrl}/${objectKey}`, request);
  const response = await send(init);
  if (response.status === 403) {
    const head = init.method === "HEAD";
    if (await deniedAsMissing(response, origin.kind, head)) return head ? DENIED_HEAD : null;
    throw new OriginError("unavailable", "origin answered 403");
  }
  if (response.status === 416 && !response.headers.has("Content-Range")) {
    // Some stores answer an unsatisfiable range without the size (moto, an XML InvalidRange
    // body alone); the client's 416 must say it (RFC 9110 §15.5.17): a HEAD tells.
    void response.body?.cancel();
    const head = fromHttp(await send({ ...init, method: "HEAD", headers: {} }));
    return head === null ? null : { ...head, body: null, status: 416, range: null };
  }
  return fromHttp(response);
}

/**
 * Reads `<ORIGIN_PREFIX><key>` from the origin, or null when the origin has no such object;
 * DENIED_HEAD when a HEAD was answered 403.
 *
 * Only the answer's headers are awaited: the caller passes the body on as a stream.
 * Throws OriginError when the origin fails or does not answer in time.
 */
export function readObject(
  config: Config,
  key: string,
  options: ReadOptions = {},
): Promise<OriginObject | null | typeof DENIED_HEAD> {
  return withTimeout(config.timeoutMs, (signal) => originRead(config, key, options, signal));
}

/** All of `body`, given up (and the stream cancelled) when `signal` aborts. */
async function readAll(body: ReadableStream | null, signal: AbortSignal): Promise<ArrayBuffer> {
  if (body === null) return new ArrayBuffer(0);
  const reader = body.getReader();
  const stop = () => void reader.cancel(signal.reason).catch(() => undefined);
  if (signal.aborted) stop();
  else signal.addEventListener("abort", stop, { once: true });
  try {
    const chunks: Uint8Array[] = [];
    let total = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const chunk = value instanceof Uint8Array ? value : new Uint8Array(value as ArrayBuffer);
      chunks.push(chunk);
      total += chunk.byteLength;
    }
    const whole = new Uint8Array(total);
    let offset = 0;
    for (const chunk of chunks) {
      whole.set(chunk, offset);
      offset += chunk.byteLength;
    }
    return whole.buffer;
  } finally {
    signal.removeEventListener("abort", stop);
  }
}

/**
 * Reads the whole object at `<ORIGIN_PREFIX><key>`, headers and body, or null when the origin
 * has no such object.
 *
 * ORIGIN_TIMEOUT_MS bounds the whole read, not only the headers: a body that stalls answers
 * OriginError "timeout" (and is cancelled), one that fails midway OriginError "unavailable".
 */
export function readWholeObject(
  config: Config,
  key: string,
): Promise<{ object: OriginObject; body: ArrayBuffer } | null> {
  return withTimeout(config.timeoutMs, async (signal) => {
    const object = await originRead(config, key, {}, signal);
    // A GET's 403 is judged by its code (deniedAsMissing): DENIED_HEAD is a HEAD's alone.
    if (object === null || object === DENIED_HEAD) return null;
    return { object, body: await readAll(object.body, signal) };
  });
}

/**
 * Keys under `prefix` (relative to ORIGIN_PREFIX), and with `delimiter` the folders below it;
 * `modified` has each key's upload time (ms), where the origin says it. `complete` is false when
 * the listing stopped at its page budget with more to list.
 */
export interface Listing {
  keys: string[];
  folders: string[];
  modified: Map<string, number>;
  complete: boolean;
}

/** Pages of 1000 keys listed by default: folder listings fit in one. */
export const MAX_LIST_PAGES = 10;

function xmlText(value: string): string {
  return value
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&amp;/g, "&");
}

// The ListObjectsV2 answer: <Contents><Key>..</Key>..</Contents> and
// <CommonPrefixes><Prefix>..</Prefix></CommonPrefixes> (docs.aws.amazon.com, ListObjectsV2).
function fromListXml(
  xml: string,
  strip: number,
): Omit<Listing, "complete"> & { next: string | null } {
  const keys: string[] = [];
  const modified = new Map<string, number>();
  for (const [contents] of xml.matchAll(/<Contents>[\s\S]*?<\/Contents>/g)) {
    const key = /<Key>([^<]*)<\/Key>/.exec(contents)?.[1];
    if (key === undefined) continue;
    const name = xmlText(key).slice(strip);
    keys.push(name);
    const when = Date.parse(/<LastModified>([^<]*)<\/LastModified>/.exec(contents)?.[1] ?? "");
    if (!Number.isNaN(when)) modified.set(name, when);
  }
  const folders = [...xml.matchAll(/<CommonPrefixes>\s*<Prefix>([^<]*)<\/Prefix>/g)].map((m) =>
    xmlText(m[1] ?? "").slice(strip),
  );
  const truncated = /<IsTruncated>\s*true\s*<\/IsTruncated>/.test(xml);
  const token = /<NextContinuationToken>([^<]*)<\/NextContinuationToken>/.exec(xml)?.[1];
  return { keys, folders, modified, next: truncated && token ? xmlText(token) : null };
}

/**
 * Lists the keys under `prefix`, page after page (1000 keys each), up to `maxPages` pages, all
 * within ORIGIN_TIMEOUT_MS. Listing order is the keys', not their time.
 */
export function listKeys(
  config: Config,
  prefix: string,
  { delimiter, maxPages = MAX_LIST_PAGES }: { delimiter?: string; maxPages?: number } = {},
): Promise<Listing> {
  const full = config.prefix + prefix;
  const strip = config.prefix.length;
  const origin = config.origin;
  return withTimeout(config.timeoutMs, async (signal) => {
    const listing: Listing = { keys: [], folders: [], modified: new Map(), complete: false };
    let cursor: string | null = null;
    for (let page = 0; page < maxPages; page++) {
      let next: string | null;
      if (origin.kind === "r2") {
        const listed = await origin.bucket.list({
          prefix: full,
          limit: 1000,
          ...(delimiter ? { delimiter } : {}),
          ...(cursor ? { cursor } : {}),
        });
        for (const object of listed.objects) {
          const key = object.key.slice(strip);
          listing.keys.push(key);
          listing.modified.set(key, object.uploaded.getTime());
        }
        listing.folders.push(...listed.delimitedPrefixes.map((p) => p.slice(strip)));
        next = listed.truncated ? listed.cursor : null;
      } else {
        const query = new URLSearchParams({ "list-type": "2", prefix: full, "max-keys": "1000" });
        if (delimiter) query.set("delimiter", delimiter);
        if (cursor) query.set("continuation-token", cursor);
        const init: RequestInit = { method: "GET", redirect: "manual", signal };
        const response =
          origin.kind === "s3"
            ? await s3Client(config).fetch(`${origin.endpoint}/${origin.bucket}?${query}`, init)
            : await fetch(`${origin.baseUrl}?${query}`, init);
        if (response.status !== 200) throw failure(response, "origin list");
        const page = fromListXml(await response.text(), strip);
        listing.keys.push(...page.keys);
        listing.folders.push(...page.folders);
        for (const [key, when] of page.modified) listing.modified.set(key, when);
        next = page.next;
      }
      if (next === null) {
        listing.complete = true;
        break;
      }
      cursor = next;
    }
    return listing;
  });
}
