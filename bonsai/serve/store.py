"""The in-memory store behind `response_format="url"`: encoded images under unguessable ids, oldest dropped
first."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

ID_BYTES = 16  # 128 random bits: the id is the only key to the image


class ImageStore:
    """At most `max_bytes` of images; `put` returns an id, `get` (bytes, media type) or None once dropped."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        image_id = secrets.token_urlsafe(ID_BYTES)
        with self._lock:
            self._images[image_id] = (data, media_type)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                _, (old, _) = self._images.popitem(last=False)
                self._bytes -= len(old)
        return image_id

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._images.get(image_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)
