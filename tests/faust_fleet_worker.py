"""A Faust worker used by tests/test_kafka_integration.py (run as a subprocess).

It consumes audio chunks from FLEET_TOPIC with a Faust agent, decodes each one with
stream_asd.wire.decode_chunk and appends one JSON line per chunk to FLEET_OUT:
{"device", "seq", "crc", "partition", "offset"} (or {"error": ...} for an undecodable one).

    FLEET_BOOTSTRAP=127.0.0.1:PORT FLEET_TOPIC=t FLEET_OUT=out.jsonl FLEET_APP_ID=g \\
        python tests/faust_fleet_worker.py worker -l warn --without-web
"""

from __future__ import annotations

import json
import os
import zlib

import faust

from stream_asd.config import load_settings
from stream_asd.errors import WireFormatError
from stream_asd.kafka import faust_settings
from stream_asd.wire import decode_chunk

settings = load_settings(None, {"kafka": {"bootstrap": os.environ["FLEET_BOOTSTRAP"]}})
app = faust.App(
    os.environ["FLEET_APP_ID"],
    **faust_settings(
        settings,
        store="memory://",
        web_enabled=False,
        topic_partitions=int(os.environ.get("FLEET_PARTITIONS", "6")),
        broker_commit_every=100,
        broker_commit_interval=1.0,
    ),
)
topic = app.topic(os.environ["FLEET_TOPIC"], key_type=bytes, value_type=bytes,
                  key_serializer="raw", value_serializer="raw")
out = open(os.environ["FLEET_OUT"], "a", buffering=1)  # line-buffered: the test reads as we go


@app.agent(topic)
async def record_chunks(stream):
    async for event in stream.events():
        msg = event.message
        try:
            chunk = decode_chunk(msg.key, msg.value, msg.headers)
        except WireFormatError as exc:
            out.write(json.dumps({"error": exc.reason, "partition": msg.partition, "offset": msg.offset}) + "\n")
            continue
        out.write(json.dumps({"device": chunk.device_id, "seq": chunk.seq, "crc": zlib.crc32(msg.value),
                              "partition": msg.partition, "offset": msg.offset}) + "\n")


if __name__ == "__main__":
    app.main()
