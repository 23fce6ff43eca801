"""Admission before a request may queue: who is calling, in which class, within its rate, by when.

- Identity: the API key (`Authorization: Bearer KEY` or `x-api-key: KEY`) is hashed (SHA-256) and looked
  up among the spec's tenants; keys are never stored. No key: 401, unless the spec allows anonymous traffic
  (then the anonymous tenant). An unknown key is always 401.
- Class: the tenant's default, or `x-priority: NAME` when NAME is one the tenant may use. Asking for a class
  the tenant may not use is refused with 403 (never silently downgraded: the caller must know that its
  request would not be treated as asked). An unknown class name is 400.
- Rate: one token bucket per tenant (rate, burst); an empty bucket is 429 with Retry-After = the time until
  a token is back. The buckets live in a store: in this process (`LocalBuckets`, one gateway process), or in
  memory shared by every gateway worker (`shared_buckets.SharedBuckets`), so a tenant's rate is global.
- Deadline: `x-deadline-ms` (1..max_deadline_ms), or the class default.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from controlplane.spec import ClusterSpec, PriorityClass, Tenant

KEY_CACHE_SIZE = 1024  # recently seen keys -> tenant, so a hot key is hashed once


class Refused(Exception):
    """A request refused at admission: status, message and optional Retry-After seconds."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None, reason: str | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason  # for 429: rate, queue_full, displaced, deadline


def retry_after_s(wait_s: float) -> float:
    """Retry-After for a wait: whole seconds, at least one."""
    return max(1.0, math.ceil(wait_s))


def over_rate(tenant: Tenant, wait_s: float) -> Refused:
    """The refusal of a request over its tenant's rate; a token is back in `wait_s`."""
    return Refused(429, f"tenant '{tenant.name}' is over its rate of {tenant.rate:g} requests/s",
                   retry_after_s=retry_after_s(wait_s), reason="rate")


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is back."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class BucketStore(Protocol):
    """The tenants' token buckets, wherever they are kept."""

    def take(self, tenant: str) -> float:
        """Take one token of `tenant`: 0.0 when granted, else the seconds until one is back."""
        ...


class LocalBuckets:
    """The buckets of one gateway process."""

    def __init__(self, tenants: list[Tenant], clock: Callable[[], float]) -> None:
        self.buckets = {t.name: TokenBucket(t.rate, t.burst, clock) for t in tenants}

    def take(self, tenant: str) -> float:
        return self.buckets[tenant].take()


@dataclass(slots=True)
class Admitted:
    """Who asked, in which class, with how long to answer. Shared by every request that sent the same admission
    headers (`Admission.classify` caches it): never changed once made."""

    tenant: Tenant
    priority_class: PriorityClass
    deadline_s: float  # relative: seconds from now


class Admission:
    def __init__(self, spec: ClusterSpec, clock: Callable[[], float], buckets: BucketStore | None = None) -> None:
        self.by_hash = {t.api_key_sha256: t for t in spec.tenants if t.api_key_sha256}
        self.tenants = {t.name: t for t in spec.tenants}
        self.classes = {c.name: c for c in spec.priority_classes}
        self.anonymous = self.tenants.get(spec.gateway.anonymous_tenant or "") if spec.gateway.allow_anonymous \
            else None
        self.max_deadline_ms = spec.gateway.limits.max_deadline_ms
        self.buckets: BucketStore = buckets if buckets is not None else LocalBuckets(spec.tenants, clock)
        self.allowed = {t.name: {t.default_class, *t.allowed_classes} for t in spec.tenants}
        self._key_cache: dict[bytes, Tenant] = {}
        self._classified: dict[tuple[bytes | None, ...], Admitted] = {}

    def identify(self, headers: dict[bytes, bytes]) -> Tenant:
        key = headers.get(b"x-api-key")
        if key is None:
            authorization = headers.get(b"authorization")
            if authorization is not None:
                scheme, _, value = authorization.partition(b" ")
                if scheme.lower() != b"bearer" or not value.strip():
                    raise Refused(401, "Authorization must be 'Bearer <API key>'")
                key = value.strip()
        if key is None:
            if self.anonymous is not None:
                return self.anonymous
            raise Refused(401, "an API key is required (Authorization: Bearer KEY, or x-api-key: KEY)")
        tenant = self._key_cache.get(key)
        if tenant is None:
            tenant = self.by_hash.get(hashlib.sha256(key).hexdigest())
            if tenant is None:
                raise Refused(401, "unknown API key")
            if len(self._key_cache) >= KEY_CACHE_SIZE:
                self._key_cache.clear()
            self._key_cache[key] = tenant
        return tenant

    def admit(self, headers: dict[bytes, bytes]) -> Admitted:
        """Identity, class, rate and deadline of a request, or Refused."""
        admitted = self.classify(headers)
        self.charge(admitted)
        return admitted

    def classify(self, headers: dict[bytes, bytes]) -> Admitted:
        """Identity, class and deadline of a request (no token taken yet), or Refused. They depend on four
        header values only, so a client that sends the same ones again (the usual case) costs one lookup."""
        key = (headers.get(b"x-api-key"), headers.get(b"authorization"), headers.get(b"x-priority"),
               headers.get(b"x-deadline-ms"))
        admitted = self._classified.get(key)
        if admitted is None:
            admitted = self._classify(headers)  # a refusal is not cached: it raises
            if len(self._classified) >= KEY_CACHE_SIZE:
                self._classified.clear()
            self._classified[key] = admitted
        return admitted

    def _classify(self, headers: dict[bytes, bytes]) -> Admitted:
        tenant = self.identify(headers)
        asked = headers.get(b"x-priority")
        if asked is None:
            priority_class = self.classes[tenant.default_class]
        else:
            name = asked.decode("latin-1").strip().lower()
            priority_class = self.classes.get(name)
            if priority_class is None:
                raise Refused(400, f"unknown priority class '{name}' (classes: {', '.join(self.classes)})")
            if name not in self.allowed[tenant.name]:
                raise Refused(403, f"tenant '{tenant.name}' may not use class '{name}' "
                                   f"(allowed: {', '.join(sorted(self.allowed[tenant.name]))})")
        deadline_ms = priority_class.default_deadline_ms
        asked_deadline = headers.get(b"x-deadline-ms")
        if asked_deadline is not None:
            if not asked_deadline.isdigit() or not 1 <= int(asked_deadline) <= self.max_deadline_ms:
                raise Refused(400, f"x-deadline-ms must be an integer from 1 to {self.max_deadline_ms}")
            deadline_ms = int(asked_deadline)
        return Admitted(tenant, priority_class, deadline_ms / 1000)

    def charge(self, admitted: Admitted) -> None:
        """Take a token from the tenant's bucket, or Refused (429 with Retry-After)."""
        wait = self.take_token(admitted)
        if wait > 0.0:
            raise over_rate(admitted.tenant, wait)

    def take_token(self, admitted: Admitted) -> float:
        """Take a token from the tenant's bucket: 0.0 when granted, else the seconds until one is back."""
        return self.buckets.take(admitted.tenant.name)

    def admin_ok(self, headers: dict[bytes, bytes], token_sha256: str | None) -> None:
        """Raise Refused unless the request carries the admin token."""
        if token_sha256 is None:
            raise Refused(404, "admin endpoints are disabled (set gateway.admin_token_sha256 in the spec)")
        authorization = headers.get(b"authorization", b"")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise Refused(401, "admin endpoints need Authorization: Bearer <admin token>")
        if hashlib.sha256(token.strip()).hexdigest() != token_sha256:
            raise Refused(403, "wrong admin token")
