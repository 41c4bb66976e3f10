"""The Docker image's HEALTHCHECK: exit status 0 when the vit-serve of this container is ready.

It asks /health/ready where vit-serve listens: VIT_PORT, and VIT_HOST unless that is a wildcard
address, which loopback reaches, from the environment or from a .env file in the working directory, as
vit-serve reads them (the image's HEALTHCHECK runs in its WORKDIR, where vit-serve runs). The check used
to ask 127.0.0.1:8000 whatever VIT_PORT said, so a server told to listen elsewhere was marked unhealthy
for ever.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from app.config import Settings, env_file_settings

WILDCARDS = {"0.0.0.0", "::", ""}
TIMEOUT_S = 3.0  # under the HEALTHCHECK's --timeout


def ready_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in WILDCARDS else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/health/ready"


def main() -> int:
    # Straight to the server: a container given HTTP_PROXY for its builds would otherwise send this local
    # request to the proxy, which cannot reach this container's loopback, and be marked unhealthy for ever.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    os.environ.update(env_file_settings())
    try:
        with opener.open(ready_url(Settings()), timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:  # refused, timed out, or an HTTP error status (503 while starting or draining)
        print(f"not ready: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
