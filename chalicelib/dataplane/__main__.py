"""`python -m chalicelib.dataplane --port 8080`: the data plane under uvicorn (run.sh, deployed)."""
from __future__ import annotations

import argparse


def main() -> None:
    import uvicorn

    from chalicelib.dataplane.app import create_app  # built when run, not when this entry module is imported

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="off", timeout_keep_alive=60)


if __name__ == "__main__":
    main()
