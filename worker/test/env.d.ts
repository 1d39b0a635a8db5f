import type { Env as WorkerEnv } from "../src/config";

declare global {
  namespace Cloudflare {
    interface Env extends WorkerEnv {
      IMAGES: R2Bucket;
    }
    interface GlobalProps {
      mainModule: typeof import("../src/index");
    }
  }
}
