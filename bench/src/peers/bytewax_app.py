"""ad-clicks in Bytewax, for `sluice-bench peers`.

Usage: python bytewax_app.py BOOTSTRAP TOPIC OUT_JSONL

1-minute windows sliding every 10 s over event time (the JSON field `timestamp`; an
EventClock whose watermark is the highest event time minus 60 s, advanced by system time
as well), per `campaign_id`: clicks, total_cost and unique_users. The Kafka input stops
at the end of each partition (tail=False); Bytewax then closes every open window, so the
harness keeps only windows a watermark had closed.
"""
import json
import sys
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import FileSink
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, SlidingWindower
from bytewax.testing import run_main

bootstrap, topic, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SLIDE_MS = 10_000

flow = Dataflow("ad_clicks")
kafka = kop.input("in", flow, brokers=[bootstrap], topics=[topic], tail=False)
events = op.map("parse", kafka.oks, lambda m: json.loads(m.value))
keyed = op.key_on("campaign", events, lambda e: e["campaign_id"])
clock = EventClock(ts_getter=lambda e: datetime.fromtimestamp(e["timestamp"] / 1000, tz=timezone.utc),
                   wait_for_system_duration=timedelta(seconds=60))
windower = SlidingWindower(length=timedelta(seconds=60), offset=timedelta(seconds=10), align_to=EPOCH)


def builder():
    return [0, 0.0, set()]


def folder(acc, e):
    acc[0] += 1
    acc[1] += e["cost"]
    acc[2].add(e["user_id"])
    return acc


def merger(a, b):
    return [a[0] + b[0], a[1] + b[1], a[2] | b[2]]


windows = win.fold_window("windows", keyed, clock, windower, builder, folder, merger)


def row(item):
    campaign, (window_id, acc) = item
    start = window_id * SLIDE_MS
    # FileSink routes (key, line) pairs; all to one file.
    return "out", json.dumps({"window_start": start, "window_end": start + 60_000, "campaign_id": campaign,
                              "clicks": acc[0], "total_cost": acc[1], "unique_users": len(acc[2])})


op.output("out", op.map("row", windows.down, row), FileSink(out_path))

if __name__ == "__main__":
    run_main(flow)
