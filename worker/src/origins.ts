/**
 * Reading an object from the configured origin: an R2 binding, an S3-compatible bucket (SigV4
 * through aws4fetch) or a public bucket URL.
 *
 * Every read is bounded by ORIGIN_TIMEOUT_MS. Only the fields the Worker needs are kept from the
 * origin's answer, so no origin header (and no credential) is ever passed on to a client.
 */
import { AwsClient } from "aws4fetch";
import type { Config } from "./config";

export interface OriginObject {
  body: ReadableStream;
  /** Size in bytes, when the origin says. */
  size: number | null;
  /** The entity tag, quoted as in an HTTP header. */
  etag: string | null;
  lastModified: Date | null;
  contentType: string | null;
}

/** The origin could not answer: "timeout" maps to 504, "unavailable" to 502. */
export class OriginError extends Error {
  override name = "OriginError";
  constructor(
    readonly kind: "timeout" | "unavailable",
    message: string,
  ) {
    super(message);
  }
}

// SigV4 GETs are idempotent: retry 5xx and 429 a couple of times inside the timeout.
const S3_RETRIES = 2;

function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}

async function withTimeout<T>(
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
      throw new OriginError("timeout", `no answer within ${timeoutMs} ms`);
    }
    if (err instanceof OriginError) throw err;
    throw new OriginError("unavailable", `request failed (${(err as Error)?.name ?? "error"})`);
  } finally {
    clearTimeout(timer);
  }
}

function parseDate(value: string | null): Date | null {
  if (value === null) return null;
  const time = Date.parse(value);
  return Number.isNaN(time) ? null : new Date(time);
}

function fromHttp(response: Response): OriginObject | null {
  if (response.status === 404) {
    void response.body?.cancel();
    return null;
  }
  if (response.status !== 200 || response.body === null) {
    void response.body?.cancel();
    // 403 usually means credentials or bucket policy are wrong, 3xx a misplaced base URL.
    throw new OriginError("unavailable", `origin answered ${response.status}`);
  }
  const length = response.headers.get("Content-Length");
  return {
    body: response.body,
    size: length !== null && /^\d+$/.test(length) ? Number(length) : null,
    etag: response.headers.get("ETag"),
    lastModified: parseDate(response.headers.get("Last-Modified")),
    contentType: response.headers.get("Content-Type"),
  };
}

/**
 * The object stored at `<ORIGIN_PREFIX><key>`, or null when the origin has none.
 *
 * Throws OriginError when the origin fails or does not answer in time.
 */
export function fetchObject(config: Config, key: string): Promise<OriginObject | null> {
  const objectKey = config.prefix + key;
  const origin = config.origin;
  return withTimeout(config.timeoutMs, async (signal) => {
    switch (origin.kind) {
      case "r2": {
        const object = await origin.bucket.get(objectKey);
        if (object === null) return null;
        return {
          body: object.body,
          size: object.size,
          etag: object.httpEtag,
          lastModified: object.uploaded,
          contentType: object.httpMetadata?.contentType ?? null,
        };
      }
      case "s3": {
        const client = new AwsClient({
          accessKeyId: origin.accessKeyId,
          secretAccessKey: origin.secretAccessKey,
          service: "s3",
          region: origin.region,
          retries: S3_RETRIES,
        });
        const url = `${origin.endpoint}/${origin.bucket}/${objectKey}`;
        return fromHttp(await client.fetch(url, { method: "GET", redirect: "manual", signal }));
      }
      case "public": {
        const url = `${origin.baseUrl}/${objectKey}`;
        return fromHttp(await fetch(url, { method: "GET", redirect: "manual", signal }));
      }
    }
  });
}
