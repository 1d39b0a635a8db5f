import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { vi } from "vitest";
import type { Env } from "../src/config";
import worker from "../src/index";

export const BASE = "https://img.example.com";

let counter = 0;

/** A fresh key for each test, so edge cache entries never leak between tests. */
export function newKey(kind: "png" | "thumb" = "png", day = "2026/05/01"): string {
  counter += 1;
  const id = `gen_${Date.now().toString(36)}-${counter}`;
  return `${day}/${id}${kind === "png" ? ".png" : ".thumb.webp"}`;
}

/**
 * A base URL of its own: the gallery's pages are cached at the edge by path, so a test that
 * reads `/` with its own base never sees the page another test left there.
 */
export function newBase(): string {
  counter += 1;
  return `https://t${counter}.img.example.com`;
}

/** Bytes 0..n-1 (mod 256), so any slice shows where it was cut from. */
export function bytes(n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => i % 256);
}

/**
 * Sends `request` to the Worker inside workerd and waits for its background work (the edge
 * cache write) to finish, so the next request sees the cache.
 */
export async function send(
  request: Request | string,
  overrides: Partial<Env> = {},
): Promise<Response> {
  const req = typeof request === "string" ? new Request(request) : request;
  const ctx = createExecutionContext();
  const incoming = req as Request<unknown, IncomingRequestCfProperties>;
  const response = await worker.fetch(incoming, { ...env, ...overrides }, ctx);
  // Read the body before waiting: the cache write shares its stream.
  const body = await response.arrayBuffer();
  await waitOnExecutionContext(ctx);
  const nullBody = req.method === "HEAD" || [204, 304].includes(response.status);
  return new Response(nullBody ? null : body, response);
}

/** An R2 bucket that forwards to the real local one and records every call. */
export function countingBucket(delayMs = 0): {
  bucket: R2Bucket;
  gets: () => number;
  calls: { method: string; key: string; options?: R2GetOptions }[];
} {
  const calls: { method: string; key: string; options?: R2GetOptions }[] = [];
  const wait = () =>
    delayMs > 0 ? new Promise((resolve) => setTimeout(resolve, delayMs)) : Promise.resolve();
  const bucket = {
    async get(key: string, options?: R2GetOptions) {
      calls.push({ method: "get", key, ...(options ? { options } : {}) });
      await wait();
      return env.IMAGES.get(key, options);
    },
    async head(key: string) {
      calls.push({ method: "head", key });
      await wait();
      return env.IMAGES.head(key);
    },
    async list(options?: R2ListOptions) {
      calls.push({ method: "list", key: options?.prefix ?? "" });
      return env.IMAGES.list(options);
    },
  } as unknown as R2Bucket;
  return { bucket, gets: () => calls.filter((c) => c.method === "get").length, calls };
}

/** Replaces the global fetch (which the Worker shares with the tests) with `handler`. */
export function mockFetch(handler: (request: Request) => Response | Promise<Response>) {
  const calls: Request[] = [];
  const spy = vi.spyOn(globalThis, "fetch").mockImplementation(async (input, init) => {
    const request = new Request(input, init);
    calls.push(request);
    return handler(request);
  });
  return { spy, calls };
}
