"""campaign-stats from Python: grpcio with its default settings, stubs generated from proto/.

Records events three ways, reads every kind of stats, sends a bad batch and reads its field
violations, moves the rollout while watching it, and follows a backfill's progress stream.
Exits non-zero (an AssertionError or a grpc.RpcError) when the service answers otherwise.
Run it against a fresh server (a new database): it moves the migration to DUAL_WRITE.

    python3 -m grpc_tools.protoc -I proto --python_out=clients/python/stubs \
        --grpc_python_out=clients/python/stubs proto/stats/v1/*.proto
    python3 clients/python/stats_client.py 127.0.0.1:50051
"""

import datetime
import os
import sys

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubs"))
from stats.v1 import common_pb2, migration_pb2, migration_pb2_grpc  # noqa: E402
from stats.v1 import rollout_pb2, rollout_pb2_grpc, stats_pb2, stats_pb2_grpc  # noqa: E402

USER, CAMPAIGN, OTHER = "py-user", "py-campaign", "py-other-campaign"
TODAY = datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def event(kind, campaign=CAMPAIGN, count=1, key=""):
    now = Timestamp()
    now.GetCurrentTime()
    return stats_pb2.Event(user_id=USER, campaign_id=campaign, event_type=kind, count=count,
                           occurred_at=now, idempotency_key=key)


def record(stats):
    first = stats.RecordEvent(stats_pb2.RecordEventRequest(event=event(stats_pb2.EVENT_TYPE_SENT, key="k1")))
    retry = stats.RecordEvent(stats_pb2.RecordEventRequest(event=event(stats_pb2.EVENT_TYPE_SENT, key="k1")))
    assert (first.duplicate, retry.duplicate) == (False, True), (first, retry)

    batch = stats.RecordEvents(stats_pb2.RecordEventsRequest(events=[
        event(stats_pb2.EVENT_TYPE_OPENED), event(stats_pb2.EVENT_TYPE_CLICKED),
        event(stats_pb2.EVENT_TYPE_SENT, campaign=OTHER, count=4)]))
    assert batch.stored == 3, batch

    stream = stats.StreamEvents(stats_pb2.RecordEventRequest(event=event(stats_pb2.EVENT_TYPE_REPLIED))
                                for _ in range(5))
    assert stream.stored == 5, stream
    print("recorded: 1 unary (and its retry, a duplicate), a batch of 3, a stream of 5")


def read(stats):
    one = stats.GetStats(stats_pb2.GetStatsRequest(user_id=USER, campaign_id=CAMPAIGN,
                                                    start_date=TODAY, end_date=TODAY))
    m = one.metrics
    assert (m.sent, m.opened, m.clicked, m.replied) == (1, 1, 1, 5), one

    many = stats.GetStatsForCampaigns(stats_pb2.GetStatsForCampaignsRequest(
        user_id=USER, campaign_ids=[CAMPAIGN, OTHER], start_date=TODAY, end_date=TODAY))
    assert [(s.campaign_id, s.metrics.sent) for s in many.stats] == [(CAMPAIGN, 1), (OTHER, 4)], many

    for user_id in (USER, ""):  # one user, then all users together
        for granularity in (stats_pb2.GRANULARITY_DAY, stats_pb2.GRANULARITY_WEEK, stats_pb2.GRANULARITY_MONTH):
            series = stats.GetAggregatedDailyStats(stats_pb2.GetAggregatedDailyStatsRequest(
                user_id=user_id, start_date=TODAY, end_date=TODAY, granularity=granularity))
            assert sum(b.metrics.sent for b in series.buckets) == 5, series
    print(f"read: GetStats, GetStatsForCampaigns, GetAggregatedDailyStats by day/week/month; "
          f"source {common_pb2.StorageSource.Name(one.source)}")


def bad_batch(stats):
    """400 bad events: the status must arrive whole, not as grpcio's RESOURCE_EXHAUSTED."""
    bad = [stats_pb2.Event(user_id="", campaign_id=CAMPAIGN, event_type=stats_pb2.EVENT_TYPE_SENT)] * 400
    try:
        stats.RecordEvents(stats_pb2.RecordEventsRequest(events=bad))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        status = rpc_status.from_call(error)
        assert status is not None, "no google.rpc.Status in the trailers"
        request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(request), status.details
        fields = [v.field for v in request.field_violations]
        assert fields[:2] == ["events[0].user_id", "events[1].user_id"] and len(fields) <= 50, fields
        print(f"bad batch: {error.code().name}, {len(fields)} field violations listed "
              f"(first {fields[0]}), message {error.details()[:60]!r}...")
        return
    raise AssertionError("a batch of 400 bad events was accepted")


def rollout_and_watch(rollout):
    watch = rollout.WatchRollout(rollout_pb2.WatchRolloutRequest(), timeout=30)
    current = next(watch)  # the rollout applied now; each change follows
    changed = rollout.SetRolloutPercentage(rollout_pb2.SetRolloutPercentageRequest(
        percentage=12.5, expected_version=current.version, force=True,
        reason="python client: stage 12.5 %", actor="python-client")).rollout
    assert changed.percentage == 12.5 and changed.version == current.version + 1, changed
    seen = next(watch)
    watch.cancel()
    assert (seen.version, seen.percentage) == (changed.version, 12.5), seen
    print(f"rollout: staged {changed.percentage} % at version {changed.version}, and the watch saw it")


def backfill(migration):
    migration.TransitionPhase(migration_pb2.TransitionPhaseRequest(
        target=migration_pb2.MIGRATION_PHASE_DUAL_WRITE, reason="python client: dual-write"))
    run_id = migration.StartBackfill(migration_pb2.StartBackfillRequest(batch_size=1)).run_id
    updates = list(migration.WatchRun(migration_pb2.WatchRunRequest(run_id=run_id), timeout=60))
    last = updates[-1]
    assert last.state == "completed" and last.processed >= 2, last
    assert migration.GetRun(migration_pb2.GetRunRequest(run_id=run_id)).state == "completed"
    print(f"backfill {run_id}: {len(updates)} progress updates, {last.processed} legacy rows read, "
          f"{last.copied} copied")


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stats = stats_pb2_grpc.StatsServiceStub(channel)
        record(stats)
        read(stats)
        bad_batch(stats)
        rollout_and_watch(rollout_pb2_grpc.RolloutServiceStub(channel))
        backfill(migration_pb2_grpc.MigrationServiceStub(channel))
    print("python client: every check passed")


if __name__ == "__main__":
    main()
