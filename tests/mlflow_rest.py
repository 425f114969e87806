"""A tracking server read back the way any client would: MLflow's REST API over plain urllib (test helper)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request


def rest_get(url: str, endpoint: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def rest_post(url: str, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())
