#!/usr/bin/env python3
"""Container HEALTHCHECK: healthy when this role's Prometheus endpoint answers.

Reads the port from ASD_METRICS__PORT (the app's own setting); port 0 means the role serves no
metrics (e.g. a one-shot trainer job), which counts as healthy. Standard library only.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = int(os.environ.get("ASD_METRICS__PORT", "9108") or 0)
    if port == 0:
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"metrics endpoint on port {port} not answering: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
