"""A third-party producer, as one is usually written: the official Python
CloudEvents SDK builds the event, nats-py publishes it to JetStream.

    python3 cloudevents_nats.py NATS_URL binary|structured POD COUNT

Publishes COUNT container restarts of pod default/POD with JSON data (the
proto3 JSON mapping Tidewatch documents), in the given content mode. Binary
mode sends the SDK's HTTP headers as they are (datacontenttype as
Content-Type), as producers reusing the HTTP binding do.
"""

import asyncio
import sys

import nats
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent


async def main(url: str, mode: str, pod: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(1, count + 1):
        event = CloudEvent(
            {
                "type": "dev.tidewatch.k8s.container.restarted",
                "source": "/producers/python",
                "id": f"python-{mode}-{pod}-{i}",
                "subject": f"pod/default/{pod}",
                "datacontenttype": "application/json",
            },
            {
                "namespace": "default",
                "pod": pod,
                "container": "app",
                "restartCount": i,
                "reason": "Error",
                "exitCode": 1,
            },
        )
        headers, body = (to_binary if mode == "binary" else to_structured)(event)
        if isinstance(body, str):
            body = body.encode()
        await js.publish(
            "tidewatch.raw.python.node-1",
            body,
            headers={**headers, "Nats-Msg-Id": event["id"]},
        )
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
