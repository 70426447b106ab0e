// The graphile-worker peer of the outboxd benchmark: one task, `post`, that does the same HTTP
// request outboxd's http connector does (POST <SINK_URL>, JSON body = the job payload,
// Idempotency-Key: "bench-<n>") over keep-alive connections, with graphile-worker's documented
// throughput tuning (https://worker.graphile.org/docs/performance): a local queue that fetches jobs
// in batches, and batched job completion.
//
//   node worker.mjs migrate   install/upgrade the graphile_worker schema, then exit
//   node worker.mjs run       run until killed; prints "ready" once it is listening
//
// Settings (environment): DATABASE_URL, SINK_URL, CONCURRENCY (default 32), LOCAL_QUEUE
// (localQueue.size, -1 = off; default CONCURRENCY + 1 as the docs suggest), BATCH_DELAY_MS
// (completeJobBatchDelay and failJobBatchDelay, -1 = off; default 0), MAX_POOL_SIZE (default
// max(10, CONCURRENCY + 2) as the docs recommend, capped at 90 to stay under max_connections),
// POLL_INTERVAL_MS (default 2000).
import http from "node:http";
import { Logger, run, runMigrations } from "graphile-worker";

const env = (k, d) => (process.env[k] === undefined ? d : process.env[k]);
const connectionString = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres");
const concurrency = Number(env("CONCURRENCY", "32"));
const localQueue = Number(env("LOCAL_QUEUE", String(concurrency + 1)));
const batchDelay = Number(env("BATCH_DELAY_MS", "0"));
const maxPoolSize = Number(env("MAX_POOL_SIZE", String(Math.min(90, Math.max(10, concurrency + 2)))));
const pollInterval = Number(env("POLL_INTERVAL_MS", "2000"));
const sink = new URL(env("SINK_URL", "http://127.0.0.1:8080/sink"));

// Warnings and errors only: graphile-worker logs every job at info level otherwise, which would
// measure console I/O rather than the queue.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[${level}] ${message}`);
});

const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });

function post(payload) {
  const body = JSON.stringify(payload);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        agent,
        host: sink.hostname,
        port: sink.port,
        path: sink.pathname,
        method: "POST",
        headers: {
          "content-type": "application/json",
          "content-length": Buffer.byteLength(body),
          "idempotency-key": `"bench-${payload.n}"`,
        },
      },
      (res) => {
        res.resume();
        res.on("end", () =>
          res.statusCode >= 200 && res.statusCode < 300
            ? resolve()
            : reject(new Error(`HTTP ${res.statusCode}`)),
        );
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

const preset = {
  worker: {
    connectionString,
    maxPoolSize,
    pollInterval,
    concurrentJobs: concurrency,
    completeJobBatchDelay: batchDelay,
    failJobBatchDelay: batchDelay,
    ...(localQueue > 0 ? { localQueue: { size: localQueue } } : {}),
  },
};

const mode = process.argv[2] ?? "run";
if (mode === "migrate") {
  await runMigrations({ connectionString, logger, preset });
} else {
  const runner = await run({
    connectionString,
    concurrency,
    maxPoolSize,
    pollInterval,
    noHandleSignals: true,
    logger,
    preset,
    taskList: { post: async (payload) => post(payload) },
  });
  const stop = () => runner.stop().finally(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  console.log(
    `ready concurrency=${concurrency} localQueue=${localQueue} batchDelay=${batchDelay} maxPoolSize=${maxPoolSize}`,
  );
  await runner.promise;
}
