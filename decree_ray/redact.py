"""Credentials out of everything the scanner writes: rows, error texts, logs.

A manifest may hold presigned URLs (query strings with X-Amz-Credential / X-Amz-Signature / security token) or
URLs with user:password@; `redact` keeps the scheme, host and path and drops the rest (an s3:// uri keeps its
'?', a legal key character), and masks anything shaped like an AWS access key id.
"""

from __future__ import annotations

import re

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/?#@'\"]*@)?(?P<rest>[^\s?#'\"]*)"
                  r"(?P<query>\?[^\s#'\"]*)?(?P<frag>#[^\s'\"]*)?")
_KEY_ID = re.compile(r"\b(AKIA|ASIA|AIDA|AROA|ABIA|ACCA)[A-Z0-9]{16}\b")


def _url(m: re.Match) -> str:
    if m["scheme"].lower() == "s3://":  # '?' is a legal character of an S3 key, not a query string
        return m["scheme"] + ("***@" if m["user"] else "") + m["rest"] + (m["query"] or "") + (m["frag"] or "")
    return (m["scheme"] + ("***@" if m["user"] else "") + m["rest"] + ("?***" if m["query"] else "")
            + (m["frag"] or ""))


def redact(text: str) -> str:
    """`text` with URL credentials and query strings, and AWS access key ids, replaced by ***."""
    return _KEY_ID.sub(r"\1****************", _URL.sub(_url, text))
