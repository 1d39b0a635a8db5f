import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { parseHttpDate } from "../src/http";
import { BASE, bytes, newKey, send } from "./helpers";

const MAY_2026 = Date.UTC(2026, 4, 1);

afterEach(() => {
  vi.useRealTimers();
});

// RFC 9110 §5.6.7: an RFC 850 date's two-digit year that appears more than 50 years in the
// future is the most recent past year with the same last two digits. Date.parse reads 00-49
// as 20xx and 50-99 as 19xx, whatever the date.
describe("RFC 850 dates", () => {
  it.each([
    ["Sunday, 06-Nov-94 08:49:37 GMT", "1994-11-06T08:49:37Z"],
    ["Thursday, 01-Jan-60 00:00:00 GMT", "2060-01-01T00:00:00Z"],
    ["Saturday, 01-Jan-50 00:00:00 GMT", "2050-01-01T00:00:00Z"],
    ["Wednesday, 01-Jan-76 00:00:00 GMT", "2076-01-01T00:00:00Z"],
    ["Saturday, 01-Jan-77 00:00:00 GMT", "1977-01-01T00:00:00Z"],
    ["Saturday, 01-Jan-00 00:00:00 GMT", "2000-01-01T00:00:00Z"],
    ["Friday, 01-May-26 00:00:00 GMT", "2026-05-01T00:00:00Z"],
  ])("reads %s, in May 2026, as %s", (text, time) => {
    expect(parseHttpDate(text, MAY_2026)).toBe(Date.parse(time));
  });

  it("takes a year exactly 50 years ahead, and the one a second later back a century", () => {
    const now = Date.UTC(2026, 0, 1);
    expect(parseHttpDate("Wednesday, 01-Jan-76 00:00:00 GMT", now)).toBe(Date.UTC(2076, 0, 1));
    expect(parseHttpDate("Thursday, 01-Jan-76 00:00:01 GMT", now)).toBe(
      Date.UTC(1976, 0, 1, 0, 0, 1),
    );
  });

  it.each([
    ["Friday, 01-Jan-00 00:00:00 GMT", "2100-01-01T00:00:00Z"],
    ["Wednesday, 01-Jan-49 00:00:00 GMT", "2149-01-01T00:00:00Z"],
    ["Saturday, 01-Jan-50 00:00:00 GMT", "2050-01-01T00:00:00Z"],
    ["Thursday, 01-Jan-99 00:00:00 GMT", "2099-01-01T00:00:00Z"],
  ])("reads %s, in June 2099, as %s", (text, time) => {
    expect(parseHttpDate(text, Date.UTC(2099, 5, 1))).toBe(Date.parse(time));
  });

  it("reads the two-digit year against the clock when given no time", () => {
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(MAY_2026);
    expect(parseHttpDate("Thursday, 01-Jan-60 00:00:00 GMT")).toBe(Date.UTC(2060, 0, 1));
    vi.setSystemTime(Date.UTC(2000, 0, 1));
    expect(parseHttpDate("Thursday, 01-Jan-60 00:00:00 GMT")).toBe(Date.UTC(1960, 0, 1));
  });

  it.each(["Thursday, 01-Jan-60 25:00:00 GMT", "Thursday, 32-Jan-60 00:00:00 GMT"])(
    "is none for %s",
    (text) => {
      expect(parseHttpDate(text, MAY_2026)).toBeNull();
    },
  );

  it("judges If-Unmodified-Since and If-Modified-Since by it, on a miss and on a hit", async () => {
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(MAY_2026);
    const key = newKey();
    await env.IMAGES.put(key, bytes(10));
    const url = `${BASE}/${key}`;
    const ahead = "Thursday, 01-Jan-60 00:00:00 GMT"; // 2060, after the object was stored
    const behind = "Saturday, 01-Jan-77 00:00:00 GMT"; // 1977, before
    const cases: [Record<string, string>, number][] = [
      [{ "If-Unmodified-Since": ahead }, 200],
      [{ "If-Unmodified-Since": behind }, 412],
      [{ "If-Modified-Since": ahead }, 304],
      [{ "If-Modified-Since": behind }, 200],
    ];
    for (const cached of [false, true]) {
      if (cached) await send(url);
      for (const [headers, status] of cases) {
        const res = await send(new Request(url, { headers }));
        expect(res.status, `${JSON.stringify(headers)} cached=${cached}`).toBe(status);
      }
    }
  });
});
