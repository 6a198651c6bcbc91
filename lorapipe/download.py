"""A safe, polite downloader for image URLs.

Safe: only http and https; the host is resolved here and every address is checked (no loopback,
private, link-local or other non-public address unless explicitly allowed), and the connection goes
to the very address that was checked (the URL carries the IP; Host header and TLS SNI carry the
name, so certificates are still verified against the name). Redirects are followed here, one hop at
a time, each hop checked again. A byte cap is enforced while streaming, the content is checked by
its magic bytes, and a file appears in the destination only complete (temp file, then rename).

Polite: connect/read timeouts and a deadline per file, retries with exponential backoff and jitter
that honour Retry-After, and a limit on simultaneous downloads per host.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import logging
import os
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable
from urllib.parse import urljoin, urlsplit

import httpx

from lorapipe.fsutil import publish
from lorapipe.images import FILE_SUFFIX, HEAD_BYTES, describe_content, sniff_format

log = logging.getLogger("lorapipe.download")

REDIRECTS = {301, 302, 303, 307, 308}
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 5
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DownloadFailed(Exception):
    """The URL gave no usable image; `reason` goes into the manifest ('blocked: ...', 'too_large: ...')."""

    def __init__(self, reason: str, retry_after: float | None = None, retryable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = retryable


@dataclass(frozen=True)
class Downloaded:
    url: str
    path: Path
    sha256: str
    size: int
    format: str
    final_url: str


@dataclass
class DownloadPolicy:
    max_bytes: int = 40_000_000
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0
    retries: int = 3
    backoff: float = 1.0
    max_retry_after: float = 60.0
    concurrency: int = 8
    per_host: int = 2
    allow: list = field(default_factory=list)
    user_agent: str = "lorapipe"
    verify: object = True  # httpx's `verify`: True (system CAs) or an ssl.SSLContext with other CAs

    @classmethod
    def from_config(cls, config) -> "DownloadPolicy":
        allow = []
        for entry in config.allow_addresses:
            try:
                allow.append(ipaddress.ip_network(entry, strict=False))
            except ValueError as err:
                raise ValueError(f"collect.allow_addresses: {entry!r} is not an IP address or network") from err
        return cls(
            max_bytes=config.max_file_bytes, connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout, total_timeout=config.download_timeout, retries=config.retries,
            backoff=config.backoff_seconds, max_retry_after=config.max_retry_after,
            concurrency=config.concurrency, per_host=config.per_host_concurrency, allow=allow,
            user_agent=config.user_agent,
        )


def is_url(source: str) -> bool:
    """A photo source that is downloaded (the others are local paths)."""
    return source.lower().startswith(("http://", "https://"))


def as_sources(images: str | list[str]) -> list[str]:
    """The `images` setting (one source or several) as a list."""
    return [images] if isinstance(images, str) else list(images)


def address_problem(address: str, allow: Iterable = ()) -> str | None:
    """Why this address may not be reached, or None for a public (or explicitly allowed) one."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if any(ip in net for net in allow):
        return None
    if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    elif ip.version == 6 and ip in NAT64:
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in allow):
        return None
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; DownloadFailed('bad_url: ...') for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as err:
        raise DownloadFailed(f"bad_url: {err}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadFailed(f"bad_url: only http and https are downloaded, not {scheme or 'a bare path'!r}")
    if not host:
        raise DownloadFailed("bad_url: no host name")
    if parts.username or parts.password:
        raise DownloadFailed("bad_url: credentials in URLs are not sent")
    if problem := host_name_problem(host):
        raise DownloadFailed(f"bad_url: {host!r} is not a valid host name ({problem})")
    return scheme, host, port or (443 if scheme == "https" else 80)


def host_name_problem(host: str) -> str | None:
    """Why `host` can never resolve (a typo, not a network hiccup: no retry), or None.

    An IP literal is fine; a name must encode as IDNA into dot-separated labels of 1-63 letters, digits,
    hyphens and underscores, at most 253 characters in all (RFC 1035, RFC 5890).
    """
    try:
        ipaddress.ip_address(host.split("%")[0])
        return None
    except ValueError:
        pass
    try:
        ascii_name = host.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError as err:
        return str(err)
    if len(ascii_name) > 253:
        return "longer than 253 characters"
    for label in ascii_name.split("."):
        if not 1 <= len(label) <= 63:
            return "an empty label or one longer than 63 characters"
        if not all(c.isalnum() or c in "-_" for c in label) or label.startswith("-") or label.endswith("-"):
            return f"the label {label!r} has characters a host name cannot have"
    return None


def resolve_checked(host: str, port: int, allow: Iterable = ()) -> str:
    """The first address of `host` that may be reached; DownloadFailed naming the problem if none may."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as err:
        raise DownloadFailed(f"bad_url: {host!r} is not a valid host name ({err})") from err
    except socket.gaierror as err:
        # "No such name" is the answer, not a hiccup: retried on the next run, not now. Anything else
        # (EAI_AGAIN: the resolver did not answer) may pass on a second try.
        missing = err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        raise DownloadFailed(f"unreachable: cannot resolve {host} ({err})", retryable=not missing) from err
    problems = []
    for *_, sockaddr in infos:
        problem = address_problem(sockaddr[0], allow)
        if problem is None:
            return sockaddr[0]
        problems.append(problem)
    raise DownloadFailed(f"blocked: {host} resolves to a non-public address ({problems[0]})")


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Downloader:
    def __init__(self, policy: DownloadPolicy, dest: str | Path):
        self.policy = policy
        self.dest = Path(dest)
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._host_slots.setdefault(host.lower(), threading.BoundedSemaphore(self.policy.per_host))

    def fetch(self, url: str) -> Downloaded:
        """Download one URL, retrying what may pass on a second try. Raises DownloadFailed."""
        _, host, _ = split_url(url)
        with self._slot(host):
            for attempt in range(self.policy.retries + 1):
                try:
                    return self._fetch_once(url)
                except DownloadFailed as err:
                    if not err.retryable or attempt == self.policy.retries:
                        raise
                    delay = self._delay(attempt, err.retry_after)
                    if delay is None:
                        raise DownloadFailed(f"{err.reason}; the server asked to wait {err.retry_after:.0f} s, more "
                                             f"than max_retry_after ({self.policy.max_retry_after:.0f} s)") from err
                    log.info("%s: %s; retry %d in %.1f s", url, err.reason, attempt + 1, delay)
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            return retry_after if retry_after <= self.policy.max_retry_after else None
        # Exponential backoff with "equal jitter": never zero, never in lockstep with other clients.
        step = self.policy.backoff * 2**attempt
        return step / 2 + random.uniform(0, step / 2)

    def _fetch_once(self, url: str) -> Downloaded:
        p = self.policy
        timeout = httpx.Timeout(connect=p.connect_timeout, read=p.read_timeout, write=p.read_timeout,
                                pool=p.connect_timeout)
        deadline = time.monotonic() + p.total_timeout
        # One client per attempt and no keep-alive: a pooled connection is keyed by IP, and must never
        # carry a request for another host name (its TLS session was made for the first one's SNI).
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=p.verify,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            current = url
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    scheme, host, port = split_url(current)
                    address = resolve_checked(host, port, p.allow)
                except DownloadFailed as err:
                    if current == url:
                        raise
                    kind, _, detail = err.reason.partition(": ")
                    raise DownloadFailed(f"{kind}: redirected to {current}: {detail}", retryable=err.retryable)
                request = client.build_request(
                    "GET", pinned_url(current, address),
                    headers={"Host": host_header(host, port, scheme), "User-Agent": p.user_agent,
                             "Accept": "image/*"},
                    extensions={"sni_hostname": host} if scheme == "https" else {},
                )
                try:
                    response = client.send(request, stream=True)
                except httpx.InvalidURL as err:  # httpx reads a redirect's Location (a data: URL, say) itself
                    raise DownloadFailed(f"bad_url: redirected from {current} to an unusable URL ({err})") from err
                except httpx.TimeoutException as err:
                    raise DownloadFailed(f"timeout: {type(err).__name__} from {host}", retryable=True) from err
                except httpx.TransportError as err:
                    if "CERTIFICATE_VERIFY_FAILED" in str(err):  # will not pass on a second try
                        raise DownloadFailed(f"tls_error: {host}: {err}") from err
                    raise DownloadFailed(f"unreachable: {host}: {err or type(err).__name__}", retryable=True) from err
                try:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    return self._save(url, current, response, deadline)
                finally:
                    response.close()
            raise DownloadFailed(f"too_many_redirects: more than {MAX_REDIRECTS}")

    def _save(self, url: str, final_url: str, response: httpx.Response, deadline: float) -> Downloaded:
        p = self.policy
        status = response.status_code
        if status != 200:
            retryable = status in RETRY_STATUS
            retry_after = retry_after_seconds(response.headers.get("retry-after")) if retryable else None
            raise DownloadFailed(f"http_error: {status} {response.reason_phrase}".rstrip(), retry_after, retryable)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > p.max_bytes:
            raise DownloadFailed(f"too_large: Content-Length {declared} > {p.max_bytes} bytes")
        self.dest.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".tmp", dir=self.dest)
        tmp = Path(tmp_name)
        try:
            digest, size, head, fmt = hashlib.sha256(), 0, b"", None
            with os.fdopen(fd, "wb") as out:
                try:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > p.max_bytes:
                            raise DownloadFailed(f"too_large: more than {p.max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise DownloadFailed(f"timeout: not complete within {p.total_timeout:.0f} s",
                                                 retryable=True)
                        if fmt is None:
                            head += chunk[: HEAD_BYTES - len(head)]
                            if len(head) >= 64:
                                fmt = self._format(head, response)
                        digest.update(chunk)
                        out.write(chunk)
                except httpx.TimeoutException as err:
                    raise DownloadFailed(f"timeout: {type(err).__name__} while reading", retryable=True) from err
                except httpx.TransportError as err:
                    raise DownloadFailed(f"unreachable: connection lost ({err})", retryable=True) from err
            if fmt is None:
                fmt = self._format(head, response)
            final = publish(tmp, self.dest / f"{digest.hexdigest()}{FILE_SUFFIX[fmt]}")
            return Downloaded(url, final, digest.hexdigest(), size, fmt, final_url)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _format(head: bytes, response: httpx.Response) -> str:
        fmt = sniff_format(head)
        if fmt is None:
            kind = response.headers.get("content-type", "none")
            raise DownloadFailed(f"not_an_image: the server sent {describe_content(head)} (Content-Type: {kind})")
        return fmt

    def fetch_all(self, urls: list[str]) -> dict[str, Downloaded | DownloadFailed]:
        """Download many URLs at once, at most `per_host` from one host; never raises for one bad URL."""

        def one(url: str) -> Downloaded | DownloadFailed:
            try:
                return self.fetch(url)
            except DownloadFailed as err:
                log.warning("%s: not downloaded (%s)", url, err.reason)
                return err
            except Exception as err:  # a bug or an odd server must cost one URL, not the collection
                log.exception("%s: download failed", url)
                return DownloadFailed(f"error: {type(err).__name__}: {err}")

        ordered = interleave_hosts(list(dict.fromkeys(urls)))
        with ThreadPoolExecutor(max_workers=self.policy.concurrency) as pool:
            return dict(zip(ordered, pool.map(one, ordered)))


def interleave_hosts(urls: list[str]) -> list[str]:
    """Round-robin over hosts, so workers waiting for one busy host's slot don't idle the others.

    Returns the URLs in download order; fetch_all maps results back by URL.
    """
    by_host: dict[str, list[str]] = {}
    for url in urls:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:  # a malformed URL fails on its own (split_url says why), in any slot
            host = ""
        by_host.setdefault(host, []).append(url)
    queues = list(by_host.values())
    ordered = []
    while queues:
        ordered.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return ordered


def pinned_url(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, fragment="").geturl()


def host_header(host: str, port: int, scheme: str) -> str:
    default = 443 if scheme == "https" else 80
    name = f"[{host}]" if ":" in host else host
    return name if port == default else f"{name}:{port}"
