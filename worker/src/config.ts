/**
 * The Worker's configuration, read from its bindings in one place.
 *
 * Plain settings are `vars` in wrangler.jsonc; credentials are secrets (`wrangler secret put`).
 * Precedence: a secret or a `--var` given at deploy time overrides the same name in
 * wrangler.jsonc; anything unset takes the default written next to it below.
 *
 * wrangler passes a var written as JSON other than a string (`10000`, `false`, `null`) to the
 * Worker as that value, not as text. A setting that means a number takes a number
 * (ORIGIN_TIMEOUT_MS), one that means a switch a boolean (GALLERY); any other setting given
 * anything but a string is a bad setting (ConfigError, naming it).
 */

export interface Env {
  /** R2 bucket holding the images, for ORIGIN=r2. */
  IMAGES?: R2Bucket;
  /** Where images are read from: "r2" (default), "s3" or "public". */
  ORIGIN?: string;
  /**
   * Storage prefix put before every key at the origin, the prefix of IMAGEGEN_STORAGE_URL:
   * empty (default), or path segments with or without slashes at either end (`images`,
   * `images/` and `/images/` are one prefix).
   */
  ORIGIN_PREFIX?: string;
  /**
   * Milliseconds to wait for the origin's answer before replying 504; default 10000. Digits
   * (`"10000"`, blank for the default) or a JSON number, a positive safe integer either way.
   */
  ORIGIN_TIMEOUT_MS?: string | number;
  /** Base URL of a publicly readable bucket, for ORIGIN=public. */
  PUBLIC_ORIGIN_URL?: string;
  /** Endpoint of an S3-compatible API (R2, MinIO, GCS interoperability), for ORIGIN=s3. */
  S3_ENDPOINT?: string;
  S3_BUCKET?: string;
  /** SigV4 region; default "auto" (R2). GCS interoperability accepts "auto" too. */
  S3_REGION?: string;
  /** Secret. */
  S3_ACCESS_KEY_ID?: string;
  /** Secret. */
  S3_SECRET_ACCESS_KEY?: string;
  /**
   * Secret. When set, every request needs a valid signed URL. At least 16 bytes, without
   * whitespace around it; set but empty, short or padded, every request answers 500.
   */
  SIGNING_SECRET?: string;
  /**
   * Secret, optional, during a rotation: the secret SIGNING_SECRET held before. URLs it signed
   * stay valid; the Worker never signs with it.
   */
  SIGNING_SECRET_PREVIOUS?: string;
  /**
   * The gallery at `/`: "on" (default without SIGNING_SECRET), "off" (default with it), or
   * "signed" (with SIGNING_SECRET: only through a signed gallery link). JSON `true` reads as
   * "on", `false` as "off".
   */
  GALLERY?: string | boolean;
}

export type GalleryMode = "on" | "off" | "signed";

export type OriginConfig =
  | { kind: "r2"; bucket: R2Bucket }
  | {
      kind: "s3";
      endpoint: string;
      bucket: string;
      region: string;
      accessKeyId: string;
      secretAccessKey: string;
    }
  | { kind: "public"; baseUrl: string };

export interface Config {
  origin: OriginConfig;
  /** ORIGIN_PREFIX, empty or ending in one "/". */
  prefix: string;
  timeoutMs: number;
  /** Signs the gallery's links; null when images are public. */
  signingSecret: string | null;
  /** Every secret a signature may be made with: SIGNING_SECRET, then SIGNING_SECRET_PREVIOUS. */
  verifyingSecrets: readonly string[];
  gallery: GalleryMode;
}

/** A setting is missing or malformed; the message names the setting, never its value. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

export const DEFAULT_TIMEOUT_MS = 10_000;

// The functions' rule for a storage prefix (imagegen/storage/s3.py `_check_prefix`, with
// imagegen/storage/base.py `validate_key` and `_SEGMENT`): slashes at either end are dropped,
// and what is left is empty or at most 512 characters of segments, each 1 to 200 of letters,
// digits, "_", "-" and ".", not starting with "." or "-" (so never "." or ".."), none empty.
const PREFIX_SEGMENT = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$/;
const MAX_PREFIX_LENGTH = 512;

/**
 * ORIGIN_PREFIX as the functions read the prefix of IMAGEGEN_STORAGE_URL: `images`, `images/`
 * and `/images/` are one prefix, `images/` here (it is put before every key as it is), and
 * `""` or `/` none. Throws ConfigError for anything the functions refuse.
 */
function originPrefix(value: string): string {
  const prefix = value.replace(/^\/+|\/+$/g, "");
  if (prefix === "") return "";
  if (
    prefix.length > MAX_PREFIX_LENGTH ||
    !prefix.split("/").every((segment) => PREFIX_SEGMENT.test(segment))
  ) {
    throw new ConfigError(
      "ORIGIN_PREFIX must be empty or path segments of letters, digits, '_', '-' and '.', " +
        "as the prefix of IMAGEGEN_STORAGE_URL",
    );
  }
  return `${prefix}/`;
}

/** The settings that are text alone (the R2 binding and the secrets are read on their own). */
type TextSetting = Exclude<keyof Env, "IMAGES" | "SIGNING_SECRET" | "SIGNING_SECRET_PREVIOUS">;

/**
 * A setting as text, or undefined when unset. A JSON number, boolean, null, array or object
 * given as a var is refused: read as text it would be no setting of this Worker's.
 */
function text(env: Env, name: TextSetting): string | undefined {
  const value: unknown = env[name];
  if (value === undefined || typeof value === "string") return value;
  throw new ConfigError(`${name} must be a string (quoted in wrangler.jsonc's vars)`);
}

function required(env: Env, name: TextSetting, origin: string): string {
  const value = text(env, name)?.trim() ?? "";
  if (value === "") throw new ConfigError(`${name} must be set for ORIGIN=${origin}`);
  return value;
}

function httpBase(env: Env, name: "S3_ENDPOINT" | "PUBLIC_ORIGIN_URL", origin: string): string {
  const value = required(env, name, origin);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(`${name} must be an http(s) URL`);
  }
  if ((url.protocol !== "https:" && url.protocol !== "http:") || url.search || url.hash) {
    throw new ConfigError(`${name} must be an http(s) URL without query or fragment`);
  }
  return value.replace(/\/+$/, "");
}

function bucketName(env: Env): string {
  const value = required(env, "S3_BUCKET", "s3");
  // The bucket becomes a path segment of every origin URL; keep it one plain segment.
  if (!/^[A-Za-z0-9._-]+$/.test(value) || value === "." || value === "..") {
    throw new ConfigError("S3_BUCKET must be a bucket name (letters, digits, '.', '_', '-')");
  }
  return value;
}

function readOrigin(env: Env): OriginConfig {
  const kind = text(env, "ORIGIN")?.trim() || "r2";
  switch (kind) {
    case "r2":
      if (!env.IMAGES) throw new ConfigError("the R2 binding IMAGES must exist for ORIGIN=r2");
      return { kind, bucket: env.IMAGES };
    case "s3":
      return {
        kind,
        endpoint: httpBase(env, "S3_ENDPOINT", kind),
        bucket: bucketName(env),
        region: text(env, "S3_REGION")?.trim() || "auto",
        accessKeyId: required(env, "S3_ACCESS_KEY_ID", kind),
        secretAccessKey: required(env, "S3_SECRET_ACCESS_KEY", kind),
      };
    case "public":
      return { kind, baseUrl: httpBase(env, "PUBLIC_ORIGIN_URL", kind) };
    default:
      throw new ConfigError('ORIGIN must be one of "r2", "s3", "public"');
  }
}

// An HMAC is no stronger than its key (NIST SP 800-107 Rev. 1): 16 random bytes give 128 bits.
// The functions hold IMAGEGEN_URL_SIGNING_SECRET to the same rule (imagegen/settings.py).
const MIN_SIGNING_SECRET_BYTES = 16;

/**
 * A signing secret, or null when unset (images public). Set but empty, blank, padded with
 * whitespace or short, it is an error, never "no signing": taken for unset, a secret that a
 * failed `$(openssl rand -hex 32)` left empty would make every private image public, cached
 * for a year. `wrangler secret put` drops trailing whitespace (String.prototype.trimEnd, in
 * wrangler's src/utils/std.ts) where the functions' copy keeps it; one given some other way
 * (a var, the dashboard) with whitespace around it would sign differently on the two sides.
 */
function secret(env: Env, name: "SIGNING_SECRET" | "SIGNING_SECRET_PREVIOUS"): string | null {
  const value = env[name];
  if (value === undefined) return null;
  if (typeof value !== "string") throw new ConfigError(`${name} must be text`);
  if (value === "") {
    throw new ConfigError(
      `${name} is empty: give a random secret (openssl rand -hex 32), or delete it`,
    );
  }
  if (value.trim() !== value) {
    throw new ConfigError(
      `${name} begins or ends with whitespace: wrangler secret put drops trailing whitespace, ` +
        "so copies of it would sign differently",
    );
  }
  if (new TextEncoder().encode(value).length < MIN_SIGNING_SECRET_BYTES) {
    throw new ConfigError(
      `${name} is shorter than ${MIN_SIGNING_SECRET_BYTES} bytes: use openssl rand -hex 32`,
    );
  }
  return value;
}

function galleryMode(env: Env, signed: boolean): GalleryMode {
  const given: unknown = env.GALLERY;
  const switched = typeof given === "boolean" ? (given ? "on" : "off") : undefined;
  const value = switched ?? (text(env, "GALLERY")?.trim() || (signed ? "off" : "on"));
  if (value === "off") return value;
  if (value === "on" && !signed) return value;
  if (value === "signed" && signed) return value;
  throw new ConfigError(
    signed
      ? 'GALLERY must be "off" or "signed" when SIGNING_SECRET is set'
      : 'GALLERY must be "on" or "off" without SIGNING_SECRET',
  );
}

/**
 * ORIGIN_TIMEOUT_MS: digits alone (no sign, point, exponent, `0x` or leading zero), or a JSON
 * number, a positive safe integer either way; unset or blank, the default. Number() alone
 * would take "0x10" for 16, "1e1" for 10 and "5.0" for 5.
 */
function timeoutMs(env: Env): number {
  const given: unknown = env.ORIGIN_TIMEOUT_MS;
  const value = typeof given === "number" ? given : text(env, "ORIGIN_TIMEOUT_MS")?.trim();
  if (value === undefined || value === "") return DEFAULT_TIMEOUT_MS;
  const ms = typeof value === "number" || /^[1-9][0-9]*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(ms) || ms <= 0) {
    throw new ConfigError(
      "ORIGIN_TIMEOUT_MS must be a positive whole number of milliseconds, such as 10000",
    );
  }
  return ms;
}

/** Reads and checks every setting. Throws ConfigError naming the first bad one. */
export function readConfig(env: Env): Config {
  const prefix = originPrefix(text(env, "ORIGIN_PREFIX") ?? "");
  const timeout = timeoutMs(env);
  const signingSecret = secret(env, "SIGNING_SECRET");
  const previous = secret(env, "SIGNING_SECRET_PREVIOUS");
  if (previous !== null && signingSecret === null) {
    // Without SIGNING_SECRET nothing is checked: the images would be public.
    throw new ConfigError("SIGNING_SECRET_PREVIOUS is set but SIGNING_SECRET is not");
  }
  return {
    origin: readOrigin(env),
    prefix,
    timeoutMs: timeout,
    signingSecret,
    verifyingSecrets: [signingSecret, previous].filter((s): s is string => s !== null),
    gallery: galleryMode(env, signingSecret !== null),
  };
}
