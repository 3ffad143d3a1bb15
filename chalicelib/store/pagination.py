"""Cursor paging over one DynamoDB partition (of a table or of an index), for the list endpoints.

A page is one bounded read: DynamoDB's `Limit` is set to what the page still needs (limit + 1, so
`has_more` is exact without a second call), and the query resumes from an exclusive start key,
never from the top of the partition. Two ways to say where to resume, both through `after`:

* the id of the last item seen (what OpenAI's list APIs and the openai SDK's auto-pagination
  send): each list looks that item up (a GetItem, or a keys-only index query) and builds the start
  key from it with `start_key`;
* an opaque cursor (`rft_next_cursor` in list responses): DynamoDB's LastEvaluatedKey as url-safe
  base64 JSON behind a `rftc1.` prefix. It is checked against the partition being listed (its key
  names and its hash key value), so a cursor never reaches another team's or job's items.

A filtered list (a `keep` predicate, e.g. `metadata[k]=v` on jobs) cannot know how many items it
must read to find `limit` matches, so it reads at most `max_pages` DynamoDB pages; when that runs
out first the page may be short (even empty) with `has_more` true and a cursor positioned after
the last item read.

Every DynamoDB call goes through store/dynamo.py (`call`, idempotent: these are reads).
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pynamodb.attributes import NumberAttribute

from chalicelib.domain import numbers
from chalicelib.errors import InvalidRequest
from chalicelib.store import dynamo

T = TypeVar("T")

CURSOR_PREFIX = "rftc1."
MAX_CURSOR_CHARS = 2048
DEFAULT_MAX_FILTERED_PAGES = 10
MAX_KEY_BYTES = 1024                                  # DynamoDB: a sort key is at most 1,024 bytes


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool
    cursor: str | None = None      # resume after the page's last item (None: nothing after it)
    read: int = 0                     # items DynamoDB evaluated for this page (ScannedCount)
    calls: int = 0                    # Query calls made


_NO_IDS = object()


def envelope(data: list, page: Page | None = None, *, first_last=_NO_IDS, **extra) -> dict:
    """The one list answer, as OpenAI shapes it, plus rft-hub's `rft_next_cursor` and `extra` fields.
    `first_last`: add OpenAI's `first_id`/`last_id`, this value on an empty page ("" where OpenAI's
    document requires strings: files, evals; None where it allows null: checkpoints)."""
    out: dict = {"object": "list", "data": data}
    if first_last is not _NO_IDS:
        out.update(first_id=data[0]["id"] if data else first_last, last_id=data[-1]["id"] if data else first_last)
    more = bool(page is not None and page.has_more)
    out.update(has_more=more, **extra)
    out["rft_next_cursor"] = page.cursor if more else None
    return out


# ---- cursors ----------------------------------------------------------------------------------

def is_cursor(after: str | None) -> bool:
    return bool(after) and after.startswith(CURSOR_PREFIX)


def encode_cursor(key: dict[str, dict[str, str]]) -> str:
    raw = json.dumps(key, separators=(",", ":"), sort_keys=True).encode()
    return CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def key_names(model, index: str | None = None) -> list[str]:
    """The attributes of an exclusive start key: the table's keys, plus the index's."""
    return list(model._get_connection().get_meta_table().get_key_names(index))


def decode_cursor(cursor: str, model, *, hash_value: str, index: str | None = None,
                  param: str = "after") -> dict[str, dict[str, str]]:
    """The LastEvaluatedKey inside a cursor, checked: exactly the key attributes of `model` (and
    `index`), each of its attribute's type, and the hash key of the partition being listed."""
    bad = InvalidRequest("Invalid pagination cursor: pass the id of the last item you received, or "
                         "rft_next_cursor from the previous page, unchanged.", param=param)
    body = cursor[len(CURSOR_PREFIX):]
    if len(cursor) > MAX_CURSOR_CHARS or not body:
        raise bad
    try:
        key = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    names = key_names(model, index)
    if not isinstance(key, dict) or sorted(key) != sorted(names):
        raise bad
    attrs = _by_dynamo_name(model)
    for name, value in key.items():
        kind = "N" if isinstance(attrs[name][1], NumberAttribute) else "S"
        if not isinstance(value, dict) or list(value) != [kind] or not isinstance(value[kind], str) \
                or not value[kind] or not 0 < (numbers.utf8_len(value[kind]) or 0) <= MAX_KEY_BYTES:
            raise bad   # (None: lone surrogates, which no encoder takes)
        if kind == "N" and not numbers.dynamo_number_text(value[kind]):
            raise bad   # DynamoDB: at most 38 significant digits, no exponent
    meta = model._get_connection().get_meta_table()
    hash_name = meta.hash_keyname if index is None else meta.get_index_hash_keyname(index)
    if key[hash_name] != {"S": hash_value}:
        raise bad      # another team's or job's partition: never followed
    return key


def start_key(model, item, index: str | None = None) -> dict[str, dict[str, Any]]:
    """The exclusive start key that resumes a query right after `item` (a model instance)."""
    attrs = _by_dynamo_name(model)
    key = {}
    for name in key_names(model, index):
        python_name, attr = attrs[name]
        value = getattr(item, python_name)
        if value is None:
            raise ValueError(f"{model.__name__} item has no {name}")
        key[name] = {"N" if isinstance(attr, NumberAttribute) else "S": str(attr.serialize(value))}
    return key


def _by_dynamo_name(model) -> dict[str, tuple[str, Any]]:
    return {attr.attr_name: (name, attr) for name, attr in model.get_attributes().items()}


# ---- the query --------------------------------------------------------------------------------

def query(model, hash_value: str, *, limit: int, start: dict | None = None, index: str | None = None,
          newest_first: bool = True, range_key_condition=None, filter_condition=None,
          keep: Callable[[Any], bool] | None = None, page_size: int | None = None,
          max_pages: int = DEFAULT_MAX_FILTERED_PAGES, consistent_read: bool = False,
          what: str = "list") -> Page:
    """One page of `limit` items of one partition, in key order (descending if `newest_first`).

    Unfiltered (no `filter_condition`, no `keep`), DynamoDB evaluates at most limit + 1 items
    (more calls only when a 1 MB response splits them). Filtered, each call evaluates `page_size`
    items (default: what the page still needs) and at most `max_pages` calls are made, so a page
    never evaluates more than max_pages x page_size items."""
    want = limit + 1
    filtered = filter_condition is not None or keep is not None
    names = key_names(model, index)
    found: list[tuple[Any, dict]] = []
    position = start
    read = calls = 0
    while True:
        size = page_size if filtered and page_size else want - len(found)

        def one_call(position=position, size=size):
            results = model.query(hash_value, range_key_condition=range_key_condition,
                                  filter_condition=filter_condition, index_name=index,
                                  scan_index_forward=not newest_first, last_evaluated_key=position,
                                  page_size=size, consistent_read=consistent_read)
            return next(results.page_iter)

        raw = dynamo.call(one_call, idempotent=True, what=what)
        calls += 1
        read += int(raw.get("ScannedCount") or 0)
        for data in raw.get("Items") or []:
            item = model.from_raw_data(data)
            if keep is None or keep(item):
                found.append((item, {n: data[n] for n in names}))
                if len(found) == want:
                    break
        position = raw.get("LastEvaluatedKey")
        if len(found) == want:
            # Exact: a limit+1-th item exists. Resume right after the last item returned.
            page = found[:limit]
            return Page([i for i, _ in page], True, encode_cursor(page[-1][1]), read, calls)
        if position is None:
            return Page([i for i, _ in found], False, None, read, calls)
        if filtered and calls >= max_pages:
            # Out of reading budget before limit+1 matches: there may be more after what was read.
            return Page([i for i, _ in found], True, encode_cursor(position), read, calls)


NOWHERE = object()      # `after` names nothing there is: the page is empty
MAX_ID_BYTES = 1024     # longer than any id: no lookup (DynamoDB keys are at most 1,024-2,048 bytes)


def resume_at(after: str | None, model, *, hash_value: str, index: str | None = None,
              anchor: Callable[[str], Any]):
    """Where a list resumes for `after`: None (from the top), an exclusive start key, or
    NOWHERE. `after` is a cursor (rft_next_cursor, checked to stay in `hash_value`'s partition)
    or an id, which `anchor(id)` turns into the item to resume after (None: no such item)."""
    if is_cursor(after):
        return decode_cursor(after, model, hash_value=hash_value, index=index)
    if not after:
        return None
    if not 0 < (numbers.utf8_len(after) or 0) <= MAX_ID_BYTES:
        return NOWHERE      # too long for any id, or not encodable (lone surrogates)
    item = anchor(after)
    return NOWHERE if item is None else start_key(model, item, index)
