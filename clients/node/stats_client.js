// campaign-stats from Node: @grpc/grpc-js, with @grpc/proto-loader reading proto/ at run time
// (no generation step).
//
// Records events three ways, reads every kind of stats, sends a bad batch and reads its field
// violations, moves the rollout while watching it, and follows a backfill's progress stream.
// Exits non-zero when the service answers otherwise. Run it against a fresh server (a new
// database): it moves the migration to DUAL_WRITE.
//
//     npm ci --prefix clients/node
//     node clients/node/stats_client.js 127.0.0.1:50051
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');
const { promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
// googleapis' protos (google/rpc/...), as the npm package google-proto-files ships them.
const GOOGLE_PROTOS = path.dirname(require.resolve('google-proto-files/package.json'));
const USER = 'node-user';
const CAMPAIGN = 'node-campaign';
const OTHER = 'node-other-campaign';
const TODAY = new Date().toISOString().slice(0, 10);

const definition = protoLoader.loadSync(
  ['stats/v1/stats.proto', 'stats/v1/rollout.proto', 'stats/v1/migration.proto'],
  { includeDirs: [PROTO_DIR], keepCase: true, longs: Number, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).stats.v1;

// google.rpc.Status and BadRequest, to read the details of an error.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) => path.join(GOOGLE_PROTOS, target);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');
const BadRequest = rpcTypes.lookupType('google.rpc.BadRequest');

/** `client.method` as a function answering a promise. */
function unary(client, method) {
  return promisify(client[method].bind(client));
}

function event(kind, { campaign = CAMPAIGN, count = 1, key = '' } = {}) {
  const now = Date.now();
  return {
    user_id: USER, campaign_id: campaign, event_type: kind, count,
    occurred_at: { seconds: Math.floor(now / 1000), nanos: (now % 1000) * 1e6 }, idempotency_key: key,
  };
}

async function record(stats) {
  const recordEvent = unary(stats, 'RecordEvent');
  const first = await recordEvent({ event: event('EVENT_TYPE_SENT', { key: 'k1' }) });
  const retry = await recordEvent({ event: event('EVENT_TYPE_SENT', { key: 'k1' }) });
  assert.deepEqual([first.duplicate, retry.duplicate], [false, true]);

  const batch = await unary(stats, 'RecordEvents')({
    events: [event('EVENT_TYPE_OPENED'), event('EVENT_TYPE_CLICKED'),
      event('EVENT_TYPE_SENT', { campaign: OTHER, count: 4 })],
  });
  assert.equal(batch.stored, 3);

  const streamed = await new Promise((resolve, reject) => {
    const call = stats.StreamEvents((error, answer) => (error ? reject(error) : resolve(answer)));
    for (let i = 0; i < 5; i += 1) call.write({ event: event('EVENT_TYPE_REPLIED') });
    call.end();
  });
  assert.equal(streamed.stored, 5);
  console.log('recorded: 1 unary (and its retry, a duplicate), a batch of 3, a stream of 5');
}

async function read(stats) {
  const range = { start_date: TODAY, end_date: TODAY };
  const one = await unary(stats, 'GetStats')({ user_id: USER, campaign_id: CAMPAIGN, ...range });
  const m = one.metrics;
  assert.deepEqual([m.sent, m.opened, m.clicked, m.replied], [1, 1, 1, 5]);

  const many = await unary(stats, 'GetStatsForCampaigns')({ user_id: USER, campaign_ids: [CAMPAIGN, OTHER], ...range });
  assert.deepEqual(many.stats.map((s) => [s.campaign_id, s.metrics.sent]), [[CAMPAIGN, 1], [OTHER, 4]]);

  const series = unary(stats, 'GetAggregatedDailyStats');
  for (const user_id of [USER, '']) { // one user, then all users together
    for (const granularity of ['GRANULARITY_DAY', 'GRANULARITY_WEEK', 'GRANULARITY_MONTH']) {
      const answer = await series({ user_id, granularity, ...range });
      assert.equal(answer.buckets.reduce((sum, b) => sum + b.metrics.sent, 0), 5);
    }
  }
  console.log(`read: GetStats, GetStatsForCampaigns, GetAggregatedDailyStats by day/week/month; source ${one.source}`);
}

async function badBatch(stats) {
  const bad = Array(400).fill({ user_id: '', campaign_id: CAMPAIGN, event_type: 'EVENT_TYPE_SENT' });
  const error = await unary(stats, 'RecordEvents')({ events: bad }).then(
    () => assert.fail('a batch of 400 bad events was accepted'),
    (e) => e,
  );
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT, error.message);
  const [details] = error.metadata.get('grpc-status-details-bin');
  assert.ok(details, 'no google.rpc.Status in the trailers');
  const status = Status.decode(details);
  assert.equal(status.details[0].type_url, 'type.googleapis.com/google.rpc.BadRequest');
  const fields = BadRequest.decode(status.details[0].value).field_violations.map((v) => v.field);
  assert.deepEqual(fields.slice(0, 2), ['events[0].user_id', 'events[1].user_id']);
  assert.ok(fields.length <= 50, `${fields.length} violations listed`);
  console.log(`bad batch: INVALID_ARGUMENT, ${fields.length} field violations listed (first ${fields[0]}), `
    + `message ${JSON.stringify(error.details.slice(0, 60))}...`);
}

async function rolloutAndWatch(rollout) {
  const watch = rollout.WatchRollout({});
  const updates = watch[Symbol.asyncIterator]();
  const current = (await updates.next()).value; // the rollout applied now; each change follows
  const changed = (await unary(rollout, 'SetRolloutPercentage')({
    percentage: 12.5, expected_version: current.version, force: true,
    reason: 'node client: stage 12.5 %', actor: 'node-client',
  })).rollout;
  assert.equal(changed.percentage, 12.5);
  assert.equal(changed.version, current.version + 1);
  const seen = (await updates.next()).value;
  watch.cancel();
  assert.deepEqual([seen.version, seen.percentage], [changed.version, 12.5]);
  console.log(`rollout: staged ${changed.percentage} % at version ${changed.version}, and the watch saw it`);
}

async function backfill(migration) {
  await unary(migration, 'TransitionPhase')({ target: 'MIGRATION_PHASE_DUAL_WRITE', reason: 'node client: dual-write' });
  const { run_id } = await unary(migration, 'StartBackfill')({ batch_size: 1 });
  const updates = [];
  for await (const run of migration.WatchRun({ run_id })) updates.push(run);
  const last = updates[updates.length - 1];
  assert.equal(last.state, 'completed');
  assert.ok(last.processed >= 2, `${last.processed} rows processed`);
  assert.equal((await unary(migration, 'GetRun')({ run_id })).state, 'completed');
  console.log(`backfill ${run_id}: ${updates.length} progress updates, ${last.processed} legacy rows read, `
    + `${last.copied} copied`);
}

async function main() {
  const address = process.argv[2] || '127.0.0.1:50051';
  const credentials = grpc.credentials.createInsecure();
  const stats = new v1.StatsService(address, credentials);
  await promisify(stats.waitForReady.bind(stats))(Date.now() + 30_000);
  await record(stats);
  await read(stats);
  await badBatch(stats);
  await rolloutAndWatch(new v1.RolloutService(address, credentials));
  await backfill(new v1.MigrationService(address, credentials));
  console.log('node client: every check passed');
}

main().then(() => process.exit(0), (error) => {
  console.error(error);
  process.exit(1);
});
