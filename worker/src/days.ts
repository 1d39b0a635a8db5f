/**
 * The gallery's day folders (`YYYY/MM/DD/`), found by listing the bucket with a `/` delimiter:
 * years, then the months of a year, then the days of a month.
 *
 * A walk starts at one day and goes towards older or newer days, nearest first, listing only
 * the years and months that can hold such a day: a day far before the oldest folder costs one
 * listing (the years), not one per year and month. Each listing is kept in the edge cache for
 * a while and read once per request, so the requests of that while (a day that does not exist,
 * a page past the last) list nothing again.
 */
import { GALLERY_PATTERN } from "./keys";
import { cachedJson, type Serving } from "./objects";
import { listKeys } from "./origins";

/** After every day folder: a walk towards older days from here starts at the newest. */
export const AFTER_EVERY_DAY = "~";

const YEAR = /^[0-9]{4}\/$/;
const MONTH = /^[0-9]{4}\/[0-9]{2}\/$/;

/** The folders just below `prefix` (`""`, `YYYY/` or `YYYY/MM/`), oldest first. */
export type Folders = (prefix: string) => Promise<string[]>;

/**
 * Lists folders for one request, each prefix once, from the edge cache where another request
 * of the last `maxAge` seconds listed it.
 */
export function folderLister(serving: Serving, maxAge: number): Folders {
  const listed = new Map<string, Promise<string[]>>();
  return (prefix) => {
    let folders = listed.get(prefix);
    if (folders === undefined) {
      const shape = prefix === "" ? YEAR : prefix.length === 5 ? MONTH : GALLERY_PATTERN;
      folders = cachedJson(serving, `_gallery/folders/${prefix}`, maxAge, async () => {
        const listing = await listKeys(serving.config, prefix, { delimiter: "/" });
        return listing.folders
          .filter((f) => f !== "" && f.startsWith(prefix) && shape.test(f))
          .sort();
      });
      listed.set(prefix, folders);
    }
    return folders;
  };
}

/**
 * Day folders strictly older (or newer) than `from` (a day folder, or AFTER_EVERY_DAY), nearest
 * first, listed lazily.
 */
export async function* walk(
  folders: Folders,
  from: string,
  direction: "older" | "newer",
): AsyncGenerator<string> {
  const older = direction === "older";
  // Folder names compare as their dates do; a year or month is kept while it can hold a day on
  // this side of `from`, so its listing is skipped otherwise.
  const within = (folder: string, bound: string) => (older ? folder <= bound : folder >= bound);
  const nearestFirst = (list: string[]) => (older ? [...list].reverse() : list);
  for (const year of nearestFirst(await folders(""))) {
    if (!within(year, from.slice(0, 5))) continue;
    for (const month of nearestFirst(await folders(year))) {
      if (!within(month, from.slice(0, 8))) continue;
      for (const day of nearestFirst(await folders(month))) {
        if (day !== from && within(day, from)) yield day;
      }
    }
  }
}

/** Up to `count` day folders of `walk`. */
export async function take(days: AsyncIterable<string>, count: number): Promise<string[]> {
  const taken: string[] = [];
  if (count <= 0) return taken;
  for await (const day of days) {
    taken.push(day);
    if (taken.length >= count) break;
  }
  return taken;
}

/** Whether the day folder `day` exists, listing no year or month that does not. */
export async function dayExists(folders: Folders, day: string): Promise<boolean> {
  const year = day.slice(0, 5);
  const month = day.slice(0, 8);
  return (
    (await folders("")).includes(year) &&
    (await folders(year)).includes(month) &&
    (await folders(month)).includes(day)
  );
}
