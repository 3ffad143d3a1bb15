"""`python -m chalicelib.dataplane --port 8080`: the data plane under uvicorn (run.sh, deployed)."""
from __future__ import annotations

import argparse
import gc


def main() -> None:
    import uvicorn

    from chalicelib.dataplane.app import create_app  # built when run, not when this entry module is imported

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    app = create_app()
    # Everything imported so far lives as long as the process: out of the collector's way, so a
    # full collection (a pause on the request path) walks only what requests allocate.
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="off", timeout_keep_alive=60)


if __name__ == "__main__":
    main()
