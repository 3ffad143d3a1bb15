"""Scoped keys' rules (domain/scopes.py), for every method and path shape."""
from hypothesis import given
from hypothesis import strategies as st

from chalicelib.domain import scopes

METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "post"])
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_{}-.", min_size=1, max_size=12)
PATHS = st.one_of(st.lists(SEGMENT, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
                  st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/models/{model_id}",
                                   "/v1/models/aliases", "/v1/usage", "/v1/budget", "/v1/me", "/v1/fine_tuning/jobs",
                                   "/v1/modelsx", "/v1/usage-export", "/v1/files", "/v1/evals/{eval_id}/runs"]))


@given(METHODS, PATHS)
def test_roles_by_route_shape(method, path):
    assert scopes.allows("full", method, path) and scopes.allows(None, method, path)
    assert scopes.allows("read", method, path) == (method.upper() in ("GET", "HEAD"))
    inference = scopes.allows("inference", method, path)
    if method.upper() == "POST":
        assert inference == (path in ("/v1/chat/completions", "/v1/responses"))
    elif method.upper() in ("GET", "HEAD"):
        assert inference == any(path == p or path.startswith(p + "/")
                                for p in ("/v1/models", "/v1/usage", "/v1/budget", "/v1/me"))
    else:
        assert not inference          # never a DELETE (a tuned model), a PUT, a PATCH
    assert not scopes.allows("owner", method, path)      # an unknown role is no role


@given(st.sampled_from(["inference", "read"]), st.one_of(st.none(), METHODS), st.one_of(st.none(), PATHS))
def test_a_scoped_key_on_an_unnamed_route_is_refused(role, method, path):
    if method is None or path is None:
        assert not scopes.allows(role, method, path)
        assert scopes.allows("full", method, path)


def test_model_lists():
    assert scopes.model_allowed(None, "anything")
    assert scopes.model_allowed(("bot",), "bot") and scopes.model_allowed(("bot",), "bot@3", alias="bot")
    assert scopes.model_allowed(("m:ft:1",), "bot", alias="bot", upstream="m:ft:1")
    assert not scopes.model_allowed(("bot",), "m:ft:1", upstream="m:ft:1")    # the alias's model by its id: no
    assert not scopes.model_allowed(("bot",), "other", alias="other", upstream="m:ft:2")


@given(st.lists(st.text(max_size=300), max_size=60))
def test_model_list_input(values):
    try:
        out = scopes.check_models(values)
    except ValueError:
        assert not values or len(values) > scopes.MAX_MODELS or any(
            not v.strip() or len(v) > scopes.MAX_MODEL_CHARS for v in values)
    else:
        assert out == tuple(dict.fromkeys(values)) and 0 < len(out) <= scopes.MAX_MODELS
