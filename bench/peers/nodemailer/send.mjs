// The nodemailer peer of the outboxd SMTP benchmark: the mails outboxd's smtp connector sends in
// the `smtp` scenario (From "Bench <bench@example.com>", To user@example.com, Subject
// "benchmark", text "benchmark message bench-<n>"), through nodemailer's pooled SMTP transport to
// the same SMTP sink, with the same pool size and the same number of mails in flight.
//
//   node send.mjs        sends, then prints one JSON line: {"sent", "failed", "secs", "messages_per_s"}
//
// Settings (environment): SMTP_HOST (default 127.0.0.1), SMTP_PORT (default 2525), FROM_N (first
// <n>, default 1), COUNT (default 20000), POOL (maxConnections, default 16), IN_FLIGHT (sendMail
// calls outstanding at once, default 1000 = outboxd's bench concurrency).
import nodemailer from "nodemailer";

const env = (k, d) => (process.env[k] === undefined ? d : process.env[k]);
const host = env("SMTP_HOST", "127.0.0.1");
const port = Number(env("SMTP_PORT", "2525"));
const from = Number(env("FROM_N", "1"));
const count = Number(env("COUNT", "20000"));
const pool = Number(env("POOL", "16"));
const inFlight = Number(env("IN_FLIGHT", "1000"));

const transport = nodemailer.createTransport({
  pool: true,
  maxConnections: pool,
  // outboxd keeps a connection for as long as it is healthy; nodemailer's default closes it after
  // 100 messages.
  maxMessages: Infinity,
  host,
  port,
  secure: false,
  ignoreTLS: true,
  name: "bench.example.com",
});

let next = from;
const end = from + count;
let sent = 0;
let failed = 0;
const started = process.hrtime.bigint();

async function lane() {
  while (next < end) {
    const n = next++;
    try {
      await transport.sendMail({
        from: "Bench <bench@example.com>",
        to: "user@example.com",
        subject: "benchmark",
        text: `benchmark message bench-${n}`,
      });
      sent++;
    } catch (e) {
      failed++;
      if (failed <= 5) console.error(`bench-${n}: ${e.message}`);
    }
  }
}

await Promise.all(Array.from({ length: Math.min(inFlight, count) }, lane));
const secs = Number(process.hrtime.bigint() - started) / 1e9;
transport.close();
console.log(JSON.stringify({ sent, failed, secs, messages_per_s: sent / secs }));
