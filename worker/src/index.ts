/**
 * Serves hosted images (`/<YYYY>/<MM>/<DD>/<generation-id>.png`, its thumbnail and derivatives)
 * and the gallery (`/`, `/<YYYY>/<MM>/<DD>/`).
 *
 * Request path → shape check → (signature check) → edge cache → origin. Anything that is not a
 * served shape is answered 404 before the origin is touched (`/favicon.ico` 204, a day without
 * its trailing slash a redirect), and the origin URL is built only from configuration and the
 * checked key, so the Worker is never an open proxy.
 */
import { type Config, ConfigError, type Env, readConfig } from "./config";
import { errorResponse, notFoundResponse, serveGallery } from "./gallery";
import {
  ALLOWED_METHODS,
  IMMUTABLE,
  NOT_FOUND_TTL,
  heldTo,
  preflightResponse,
  textResponse,
  withoutDateValidators,
} from "./http";
import {
  derivativeKey,
  galleryFromPath,
  imageParts,
  keyFromPath,
  slashlessGalleryDay,
  thumbnailParts,
} from "./keys";
import { acceptedFormats, availableDerivatives, candidates, widthParam } from "./negotiate";
import { objectExists, type Serving, serveObject } from "./objects";
import { OriginError } from "./origins";
import { checkSignedUrl } from "./signing";

export type { Env } from "./config";

/**
 * The answer to `/favicon.ico`, which every browser asks for: no content, kept a day, so no
 * console error and no request to the origin. Its headers are every other answer's (those of
 * textResponse: the policy that forbids scripts, nosniff, CORS), less the body's type.
 */
function faviconResponse(): Response {
  const headers = textResponse(200, "").headers;
  headers.delete("Content-Type");
  headers.set("Cache-Control", "public, max-age=86400");
  return new Response(null, { status: 204, headers });
}

/**
 * Whether `/` shows the gallery to anyone (GALLERY=on): only then do error pages link to it.
 * Read for a path answered before the configuration is (a bad configuration links nowhere).
 */
function galleryIsPublic(env: Env): boolean {
  try {
    return readConfig(env).gallery === "on";
  } catch (err) {
    if (err instanceof ConfigError) return false;
    throw err;
  }
}

async function cacheControlFor(
  request: Request,
  url: URL,
  key: string,
  config: Config,
): Promise<string | Response> {
  if (config.signingSecret === null) return IMMUTABLE;
  const now = Math.floor(Date.now() / 1000);
  const check = await checkSignedUrl(url.searchParams, key, config.verifyingSecrets, now);
  if (!check.ok) {
    // As the signed gallery says it: never a link to `/`, which needs a signed link too.
    const message =
      check.reason === "expired"
        ? { title: "This link has expired", text: "Ask whoever shared it for a new link." }
        : { title: "Forbidden", text: "This image needs a valid signed link." };
    return errorResponse(request, 403, { ...message, plain: "Forbidden" }, false);
  }
  // The signed URL stops working at `expires`; no cache may keep serving it longer.
  return `private, max-age=${check.expires - now}`;
}

/**
 * The key to serve for `key`: a derivative chosen by `Accept` and `w` for a full image. `standIn`
 * says the PNG is served where the client accepts a derivative format that does not exist, or
 * for a thumbnail that does not (yet: the derive stage makes them after the image is persisted),
 * or that a better derivative the record lists is missing from the bucket.
 *
 * Throws OriginError when a lookup fails.
 */
async function negotiated(
  request: Request,
  serving: Serving,
  key: string,
  width: number | null,
): Promise<{ key: string; standIn: boolean }> {
  const thumbnail = thumbnailParts(key);
  if (thumbnail !== null) {
    // Made by derive after the image is persisted: until then the full image stands in.
    if (await objectExists(serving, key)) return { key, standIn: false };
    return { key: pngKey(key), standIn: true };
  }
  const parts = imageParts(key);
  if (parts === null) return { key, standIn: false };
  const formats = acceptedFormats(request.headers.get("Accept"));
  if (formats.length === 0) return { key, standIn: false };
  const available = await availableDerivatives(serving, parts.day, parts.id);
  // The record may list derivatives the bucket no longer holds (a bucket restored without them:
  // imagegen/derive.py `_remake_lost` makes them again). Each candidate is looked up before it
  // is served, at most one a format (the lookup is the read that serves it); past a missing
  // one, what is served stands in, held as briefly, so clients come back for the better one.
  let skipped = false;
  for (const candidate of candidates(formats, width, available)) {
    const derivative = derivativeKey(parts.day, parts.id, candidate.format, candidate.width);
    if (await objectExists(serving, derivative)) return { key: derivative, standIn: skipped };
    skipped = true;
  }
  return { key, standIn: true };
}

/** The full image of a served key: the key itself, or the PNG a thumbnail was made from. */
function pngKey(key: string): string {
  const thumbnail = thumbnailParts(key);
  return thumbnail === null ? key : `${thumbnail.day}/${thumbnail.id}.png`;
}

/**
 * The representation to serve (see negotiated). A format or a thumbnail improves on the PNG, and
 * a failed lookup must not cost the image: where the origin fails or times out on a record, a
 * derivative or a thumbnail, the PNG stands in, held as briefly as for a missing record, and the
 * failure is not remembered, so the next request looks again. Only a failure to read the PNG
 * itself answers 502, 503 or 504.
 */
async function representation(
  request: Request,
  serving: Serving,
  key: string,
  width: number | null,
): Promise<{ key: string; standIn: boolean }> {
  try {
    return await negotiated(request, serving, key, width);
  } catch (err) {
    if (!(err instanceof OriginError)) throw err;
    const png = pngKey(key);
    console.warn(
      `origin ${serving.config.origin.kind} failed choosing the representation of ${key} ` +
        `(${err.message}): ${png} stands in`,
    );
    return { key: png, standIn: true };
  }
}

/**
 * The answer to each kind of origin failure. The Worker is the gateway: an origin that does not
 * answer in time is a 504 (RFC 9110 §15.6.5), one that answers 429 or 503 leaves the service
 * unavailable for a while, a 503 (§15.6.4), and any other failure is a bad answer, a 502
 * (§15.6.3).
 */
const ORIGIN_FAILURES = {
  timeout: {
    status: 504,
    title: "Gateway Timeout",
    text: "The image store did not answer in time. Try again shortly.",
    plain: "Origin Timeout",
  },
  busy: {
    status: 503,
    title: "Service Unavailable",
    text: "The image store is busy. Try again shortly.",
    plain: "Origin Busy",
  },
  unavailable: {
    status: 502,
    title: "Bad Gateway",
    text: "The image store failed. Try again shortly.",
    plain: "Origin Unavailable",
  },
} as const;

async function handle(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
  // 1. Method
  if (!["GET", "HEAD", "OPTIONS"].includes(request.method)) {
    return textResponse(405, "Method Not Allowed", { Allow: ALLOWED_METHODS });
  }

  // 2. Shape: only the exact served keys and gallery paths go further (OPTIONS included)
  const url = new URL(request.url);
  if (url.pathname === "/favicon.ico" && request.method !== "OPTIONS") return faviconResponse();
  const key = keyFromPath(url.pathname);
  const galleryPath = key === null ? galleryFromPath(url.pathname) : null;
  // A day without its trailing slash is redirected to the day's page (GET and HEAD).
  const slashless = key === null && galleryPath === null ? slashlessGalleryDay(url.pathname) : null;
  if (key === null && galleryPath === null && slashless === null) {
    return notFoundResponse(request, request.method !== "OPTIONS" && galleryIsPublic(env));
  }

  // 3. Configuration
  let config: Config;
  try {
    config = readConfig(env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    console.error(`configuration error: ${err.message}`);
    return textResponse(500, "Server Misconfigured");
  }
  const serving: Serving = { config, ctx, cacheBase: url.origin };
  const home = config.gallery === "on";

  // OPTIONS (a CORS preflight) is answered from the path alone: it never reaches the origin
  // and checks no signature. A gallery that is off is a 404 for every method.
  const isGallery = galleryPath !== null || slashless !== null;
  if (request.method === "OPTIONS") {
    if (isGallery && config.gallery === "off") return textResponse(404, "Not Found");
    return preflightResponse();
  }
  if (slashless !== null) {
    if (config.gallery === "off") return notFoundResponse(request, false);
    // The query goes along as it came: a signed link's signature covers the day folder with
    // its slash (docs/signed-urls.md), so a signed link that lost its slash works again.
    return textResponse(301, "Moved Permanently", { Location: `/${slashless}${url.search}` });
  }

  try {
    if (galleryPath !== null)
      return await serveGallery(request, serving, galleryPath, url.searchParams);
    if (key === null) return textResponse(404, "Not Found");

    // 4. Signature, when the images are private (it covers the parameters too)
    const cacheControl = await cacheControlFor(request, url, key, config);
    if (cacheControl instanceof Response) return cacheControl;

    // 5. Representation: format from Accept, width from w (full images only)
    const width = widthParam(url.searchParams);
    if (width === "invalid" || (width !== null && imageParts(key) === null)) {
      const rule = "w must be a whole number of pixels, 1 to 8192, on a .png URL";
      const text = `The parameter ${rule}.`;
      return errorResponse(
        request,
        400,
        { title: "Bad Request", text, plain: `Bad Request: ${rule}` },
        home,
      );
    }
    const served = await representation(request, serving, key, width);

    // 6. Edge cache, then origin. The PNG standing in for a derivative or a thumbnail (missing,
    // or its lookup failed) is kept no longer than a missing object is remembered: browsers
    // then ask again and get it.
    const policy = served.standIn ? heldTo(cacheControl, NOT_FOUND_TTL) : cacheControl;
    // A date validates only where the URL can name no other object than the one served (see
    // withoutDateValidators): a `.png` URL answered with the PNG for good, a derivative's own
    // URL. A thumbnail URL answers the PNG until derive writes the thumbnail, and a stand-in or
    // a derivative may give way to another derivative; those answers carry their ETag alone.
    const dated = !served.standIn && served.key === key && thumbnailParts(key) === null;
    const asked = dated ? request : withoutDateValidators(request);
    const response = await serveObject(asked, serving, served.key, policy);
    if (response.status === 404) {
      await response.body?.cancel();
      return await errorResponse(
        request,
        404,
        { title: "Not Found", text: "There is no such image." },
        home,
      );
    }
    if (!dated) response.headers.delete("Last-Modified");
    if (imageParts(key) !== null) response.headers.append("Vary", "Accept");
    return response;
  } catch (err) {
    if (!(err instanceof OriginError)) throw err;
    console.error(`origin ${config.origin.kind} failed for ${url.pathname}: ${err.message}`);
    const { status, ...message } = ORIGIN_FAILURES[err.kind];
    // A transient failure says when to try again (RFC 9110 §10.2.3): the origin's own time,
    // where it gave one, else a few seconds. Either way the answer is never stored.
    const retry: Record<string, string> = {};
    if (err.retryAfter !== null) retry["Retry-After"] = String(err.retryAfter);
    return await errorResponse(request, status, message, home, retry);
  }
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
