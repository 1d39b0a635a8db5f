import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

export default defineConfig({
  plugins: [
    // Tests run inside workerd with the bindings of wrangler.jsonc (R2 and the Cache API are
    // local miniflare implementations).
    cloudflareTest({ wrangler: { configPath: "./wrangler.jsonc" } }),
  ],
  server: {
    // The signed-URL vectors live in ../schemas, shared with the Python tests.
    fs: { allow: [".."] },
  },
  test: {
    include: ["test/**/*.test.ts"],
  },
});
