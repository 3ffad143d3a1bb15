#!/bin/bash
# Lambda Web Adapter's startup command (the function's handler, with AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap):
# the data plane's ASGI app on 127.0.0.1:$AWS_LWA_PORT, packages from the deployment zip.
cd "${LAMBDA_TASK_ROOT:-$(dirname "$0")/../..}" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m chalicelib.dataplane --host 127.0.0.1 --port "${AWS_LWA_PORT:-${PORT:-8080}}"
