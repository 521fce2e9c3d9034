"""ad-clicks in Quix Streams, for `sluice-bench peers`.

Usage: python quix_app.py BOOTSTRAP TOPIC RECORDS OUT_JSONL STATE_DIR

1-minute windows sliding every 10 s (Quix: hopping windows) over event time (the JSON
field `timestamp`), per message key (`campaign_id`): clicks (count), total_cost (sum of
`cost`) and unique_users (exact distinct `user_id`), emitted when final (a window closes
once the partition's highest timestamp minus the 60 s grace period passes its end). Stops
after RECORDS messages.
"""
import json
import sys
import time

from quixstreams import Application
from quixstreams.dataframe.windows.aggregations import Collector, Count, Sum

bootstrap, topic_name, records, out_path, state_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
group = "sluice-bench-quix-%d" % int(time.time() * 1000)
app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                  state_dir=state_dir, use_changelog_topics=False, loglevel="WARNING")
topic = app.topic(topic_name, value_deserializer="json", key_deserializer="str",
                  timestamp_extractor=lambda value, headers, ts, ts_type: value["timestamp"])
sdf = app.dataframe(topic)

seen = 0


def count(value):
    global seen
    seen += 1
    if seen >= records:
        app.stop()


sdf = sdf.update(count)


class DistinctCount(Collector):
    """Collects a column's values per window (Quix stores collected values once per
    message, not per window) and counts the distinct ones when the window closes."""

    def result(self, items):
        return len(set(items))


sdf = sdf.hopping_window(duration_ms=60_000, step_ms=10_000, grace_ms=60_000).agg(
    clicks=Count(), total_cost=Sum("cost"), unique_users=DistinctCount("user_id")).final()
out = open(out_path, "w")


def emit(value, key, timestamp, headers):
    out.write(json.dumps({"window_start": value["start"], "window_end": value["end"], "campaign_id": key,
                          "clicks": value["clicks"], "total_cost": value["total_cost"],
                          "unique_users": value["unique_users"]}) + "\n")


sdf = sdf.update(emit, metadata=True)
app.run()
out.close()
print(json.dumps({"records": seen}))
