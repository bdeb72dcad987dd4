// Runs the TypeScript SDK's public EnvironmentWorker the way a deployment does, for the end-to-end tests.
//
// Usage: node worker.mjs '<json options>'
//   baseURL, environmentId, environmentKey, workdir, maxIdleMs: as the worker's own options
//   mode: "run" (poll and serve until SIGTERM or stopAfterMs) or "handle" (one claimed item: handleItem)
//   item: for "handle", {workId, environmentId, sessionId, workSecret?}
//   otlpEndpoint: trace the worker with OpenTelemetry, as an application does, exporting to this
//     OTLP/HTTP endpoint: the SDK's own spans, and the trace context it sends with each request
// The worker's log lines go to stderr as JSON ({level, message, details}); on exit one JSON line
// goes to stdout: {"ok": true, "elapsed_ms": n} or {"ok": false, "error": "..."}.
import Anthropic from '@anthropic-ai/sdk';
import { EnvironmentWorker } from '@anthropic-ai/sdk/helpers/beta/environments';

const options = JSON.parse(process.argv[2]);

// Registered before the client exists: the SDK traces its API calls when a tracer provider is registered.
let tracerProvider = null;
if (options.otlpEndpoint) {
  const { context, propagation, trace } = await import('@opentelemetry/api');
  const { AsyncLocalStorageContextManager } = await import('@opentelemetry/context-async-hooks');
  const { W3CTraceContextPropagator } = await import('@opentelemetry/core');
  const { TracerProvider, BatchSpanProcessor } = await import('@opentelemetry/sdk-trace');
  const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-proto');
  const { resourceFromAttributes } = await import('@opentelemetry/resources');
  tracerProvider = new TracerProvider({
    resource: resourceFromAttributes({ 'service.name': 'sandbox-worker' }),
    spanProcessors: [
      new BatchSpanProcessor({
        exporter: new OTLPTraceExporter({ url: `${options.otlpEndpoint}/v1/traces` }),
        scheduledDelayMillis: 100,
      }),
    ],
  });
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  trace.setGlobalTracerProvider(tracerProvider);
}
const line = (level) => (message, details) =>
  process.stderr.write(JSON.stringify({ level, message, details: details ?? null }) + '\n');
const logger = { debug: line('debug'), info: line('info'), warn: line('warn'), error: line('error') };

// The worker knows only the gateway's address and its token (given as the environment key).
const client = new Anthropic({ baseURL: options.baseURL, apiKey: null, authToken: null, logger, logLevel: 'info' });
const worker = new EnvironmentWorker({
  client,
  environmentId: options.environmentId,
  environmentKey: options.environmentKey,
  workdir: options.workdir,
  maxIdleMs: options.maxIdleMs ?? 1000,
  ...(options.memory ? {} : { memorySyncIntervalMs: null }),
});

const controller = new AbortController();
process.on('SIGTERM', () => controller.abort());
if (options.stopAfterMs) setTimeout(() => controller.abort(), options.stopAfterMs).unref();

const started = Date.now();
try {
  if (options.mode === 'handle') {
    await worker.handleItem({ ...options.item, environmentKey: options.environmentKey, signal: controller.signal });
  } else {
    await worker.run(controller.signal);
  }
  await tracerProvider?.shutdown();
  process.stdout.write(JSON.stringify({ ok: true, elapsed_ms: Date.now() - started }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e) }) + '\n');
  process.exitCode = 1;
}
