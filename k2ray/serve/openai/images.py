"""Image content parts of a chat request -> preprocessed images (Ray-free; runs in the planner's worker thread).

``data:`` URLs are decoded in place; ``http(s)`` URLs are fetched when the server allows it, with a byte cap, a
timeout and a content-type check, and never from loopback, private, link-local or otherwise non-public addresses
unless ``allow_private_image_urls`` (each redirect is checked the same way). Every failure is a 400 naming the part
(``messages[i].content[j]``).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from k2ray.serve.openai.errors import bad_request
from k2ray.tokenizer.image import (SUPPORTED_MIME, ImageError, ImageProcessorConfig, ProcessedImage, load_image,
                                   parse_data_url)


@dataclass(frozen=True)
class ImageLimits:
    """``ServeArgs``' image settings."""

    max_images: int = 8  # image parts per request
    max_image_bytes: int = 10 << 20  # encoded size of one image (data: URL payload or download)
    max_image_pixels: int = 40_000_000  # width x height of one decoded image
    allow_image_urls: bool = True  # fetch http(s) image URLs (data: URLs are always accepted)
    allow_private_image_urls: bool = False  # ... also from loopback / private / link-local addresses
    image_fetch_timeout_s: float = 10.0


def _check_host(url: str, limits: ImageLimits) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"unsupported URL scheme {parts.scheme!r} (data:, http: or https: expected)")
    host = parts.hostname
    if not host:
        raise ImageError("URL without a host")
    if limits.allow_private_image_urls:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"cannot resolve the image URL's host {host!r}: {e}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ImageError(f"the image URL's host {host!r} is a non-public address ({ip}); this server does not "
                             "fetch from loopback or private networks")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limits: ImageLimits):
        self.limits = limits

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.limits)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes of an http(s) image, checked (see the module docstring). Raises :class:`ImageError`."""
    if not limits.allow_image_urls:
        raise ImageError("this server accepts images as data: URLs only (allow_image_urls is off)")
    _check_host(url, limits)
    opener = urllib.request.build_opener(_CheckedRedirects(limits))
    request = urllib.request.Request(url, headers={"User-Agent": "k2ray", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=limits.image_fetch_timeout_s) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in SUPPORTED_MIME:
                raise ImageError(f"the image URL answered with content type {ctype or 'none'!r} (expected one of "
                                 f"{', '.join(sorted(SUPPORTED_MIME))})")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_image_bytes:
                raise ImageError(f"the image has {length} bytes, over the limit of {limits.max_image_bytes}")
            data = resp.read(limits.max_image_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"fetching the image failed: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ImageError(f"fetching the image failed: {reason}") from None
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"the image is over the limit of {limits.max_image_bytes} bytes")
    return data


def image_bytes(url: str, limits: ImageLimits) -> bytes:
    if url.startswith("data:"):
        mime, data = parse_data_url(url)
        if mime and mime not in SUPPORTED_MIME:
            raise ImageError(f"unsupported image type {mime!r} (expected one of {', '.join(sorted(SUPPORTED_MIME))})")
        if len(data) > limits.max_image_bytes:
            raise ImageError(f"the image has {len(data)} bytes, over the limit of {limits.max_image_bytes}")
        return data
    return fetch_url(url, limits)


def load_images(parts: list, cfg: Optional[ImageProcessorConfig], limits: ImageLimits) -> list[ProcessedImage]:
    """The request's image parts (``ChatPrompt.images``), decoded and preprocessed; a 400 naming a bad part."""
    if not parts:
        return []
    if cfg is None:
        raise bad_request(f"{parts[0].where}: this model does not accept images", parts[0].where)
    if len(parts) > limits.max_images:
        raise bad_request(f"{parts[limits.max_images].where}: at most {limits.max_images} images per request",
                          parts[limits.max_images].where)
    out = []
    for part in parts:
        try:
            out.append(load_image(image_bytes(part.url, limits), cfg, limits.max_image_pixels))
        except ImageError as e:
            raise bad_request(f"{part.where}: {e}", part.where) from None
    return out
