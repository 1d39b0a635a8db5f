/**
 * Serves hosted images: `GET /<YYYY>/<MM>/<DD>/<generation-id>.png` and `.thumb.webp`.
 *
 * Request path → key check → (signature check) → edge cache → origin. Anything that is not a
 * served key shape is answered 404 before the origin is touched, and the origin URL is built only
 * from configuration and the checked key, so the Worker is never an open proxy.
 */
import { type Config, ConfigError, type Env, readConfig } from "./config";
import {
  ALLOWED_METHODS,
  answer,
  IMMUTABLE,
  preflightResponse,
  storedResponse,
  textResponse,
} from "./http";
import { keyFromPath } from "./keys";
import { fetchObject, OriginError } from "./origins";
import { checkSignedUrl } from "./signing";

export type { Env } from "./config";

async function cacheControlFor(url: URL, key: string, config: Config): Promise<string | Response> {
  if (config.signingSecret === null) return IMMUTABLE;
  const now = Math.floor(Date.now() / 1000);
  const check = await checkSignedUrl(url.searchParams, key, config.signingSecret, now);
  if (!check.ok) return textResponse(403, "Forbidden");
  // The signed URL stops working at `expires`; no cache may keep serving it longer.
  return `private, max-age=${check.expires - now}`;
}

async function handle(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
  // 1. Method
  if (request.method === "OPTIONS") return preflightResponse();
  if (request.method !== "GET" && request.method !== "HEAD") {
    return textResponse(405, "Method Not Allowed", { Allow: ALLOWED_METHODS });
  }

  // 2. Key: only the exact served shapes go further
  const url = new URL(request.url);
  const key = keyFromPath(url.pathname);
  if (key === null) return textResponse(404, "Not Found");

  // 3. Configuration
  let config: Config;
  try {
    config = readConfig(env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    console.error(`configuration error: ${err.message}`);
    return textResponse(500, "Server Misconfigured");
  }

  // 4. Signature, when the images are private
  const cacheControl = await cacheControlFor(url, key, config);
  if (cacheControl instanceof Response) return cacheControl;

  // 5. Edge cache, keyed by the path alone so every signature of a key shares one entry
  const cache = caches.default;
  const cacheKey = new Request(`${url.origin}/${key}`, { method: "GET" });
  let stored = await cache.match(cacheKey);

  // 6. Origin
  if (stored === undefined) {
    let object;
    try {
      object = await fetchObject(config, key);
    } catch (err) {
      if (!(err instanceof OriginError)) throw err;
      console.error(`origin ${config.origin.kind} failed for ${key}: ${err.message}`);
      return err.kind === "timeout"
        ? textResponse(504, "Origin Timeout")
        : textResponse(502, "Origin Unavailable");
    }
    if (object === null) return textResponse(404, "Not Found");
    stored = storedResponse(object, key);
    const copy = stored.clone();
    ctx.waitUntil(
      cache.put(cacheKey, copy).catch((err: unknown) => {
        console.warn(`edge cache put failed for ${key}: ${(err as Error)?.name ?? "error"}`);
      }),
    );
  }

  // 7. Answer: full, partial or not modified
  return answer(request, stored, cacheControl);
}

export default {
  async fetch(request, env, ctx): Promise<Response> {
    try {
      return await handle(request, env, ctx);
    } catch (err) {
      // Log the kind only: messages of unexpected errors may quote configuration.
      console.error(`unexpected ${(err as Error)?.name ?? "error"} serving ${request.method}`);
      return textResponse(500, "Internal Error");
    }
  },
} satisfies ExportedHandler<Env>;
