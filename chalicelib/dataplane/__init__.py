"""The data plane: the inference routes as an ASGI app that streams (Starlette, run by uvicorn).

Deployed as its own function behind the same REST API, with AWS Lambda Web Adapter in
response-stream mode (`run.sh`); locally behind the local API Gateway at the same base URL
(local/api_gateway.py). Everything it does goes through chalicelib: authentication and body
rules from api/http.py, resolution, prices, budgets and metering from inference/ (gateway.py and the modules it calls).
"""

# (method, path) of every route the data plane serves; API Gateway sends these to it
# (deploy/template.py), the local API Gateway proxies them to it (local/api_gateway.py).
ROUTES = (("POST", "/v1/chat/completions"), ("POST", "/v1/responses"))
READY_PATH = "/_dataplane/ready"       # Lambda Web Adapter's readiness check
