"""API keys (constant-time), per-key rate limits, and masking of personal data and secrets."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import threading
import time


def fingerprint(key: str) -> str:
    """What logs and metrics say about a key: a short hash, never the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyChecker:
    """Compares a presented bearer token with every configured key in constant time.

    Both sides are hashed first, so the comparison takes the same time whatever the lengths, and
    every key is compared (no early exit), so the time does not say which key came close.
    """

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str | None:
        """The fingerprint of the matching key, or None (also when the header is missing or malformed)."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for d in self._digests:
            if hmac.compare_digest(d, digest):
                found = d
        if found is None or scheme.lower() != "bearer" or not token:
            return None
        return fingerprint(token)


class RateLimiter:
    """Requests and tokens per minute per key, as token buckets that refill continuously."""

    def __init__(self, rpm: int, tpm: int, clock=time.monotonic):
        self.limits = {"requests": rpm, "tokens": tpm}
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key, kind) -> (level, time)
        self._lock = threading.Lock()

    def acquire(self, key: str, tokens: int) -> float:
        """Take one request and `tokens` tokens from key's buckets: 0.0 when allowed, else seconds to wait."""
        want = {"requests": 1, "tokens": tokens}
        with self._lock:
            now = self.clock()
            levels, wait = {}, 0.0
            for kind, limit in self.limits.items():
                if not limit:
                    continue
                level, t = self._buckets.get((key, kind), (float(limit), now))
                level = min(float(limit), level + (now - t) * limit / 60.0)
                levels[kind] = level
                if want[kind] > limit:
                    return math.inf  # can never be granted: more than a whole minute's allowance
                if level < want[kind]:
                    wait = max(wait, (want[kind] - level) * 60.0 / limit)
            if wait:
                return wait
            for kind, level in levels.items():
                self._buckets[(key, kind)] = (level - want[kind], now)
            return 0.0


# ------------------------------------------------------------------------------------------- masking

_SECRET = re.compile(
    r"\b(?:sk|pk|rk)[-_](?:live[-_]|test[-_]|proj[-_])?[A-Za-z0-9_-]{16,}"  # OpenAI / Stripe style
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{12,}"  # an Authorization header's token
    r"|(?i:\b(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*)[\"']?[^\s\"',;]{8,}"  # key=value
    r"|\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"  # long random token
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])(?:\d{2,4}[\s.-]){0,2}\d{3,4}(?![\w-])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def _ip(m: re.Match) -> str:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return m.group()
    return "[IP]"


def _phone(m: re.Match) -> str:
    return "[PHONE]" if 7 <= sum(c.isdigit() for c in m.group()) <= 15 else m.group()


def redact(text: str) -> str:
    """Mask secrets, e-mails, card numbers (Luhn-valid only), IP addresses and phone numbers.

    Secrets go first (a key may contain an '@' or digits), cards before phones (a card number
    would otherwise read as a phone number), IP addresses before phones (dotted digits).
    """
    text = _SECRET.sub("[SECRET]", text)
    text = _EMAIL.sub("[EMAIL]", text)
    text = _CARD.sub(_card, text)
    text = _IPV4.sub(_ip, text)
    text = _IPV6.sub(_ip, text)
    return _PHONE.sub(_phone, text)
