"""The in-memory store behind `response_format="url"`: PNG bytes under unguessable ids, oldest dropped first."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

ID_BYTES = 16  # 128 random bits: the id is the only key to the image


class ImageStore:
    """At most `max_bytes` of PNGs; `put` returns an id, `get` the bytes or None once dropped."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        image_id = secrets.token_urlsafe(ID_BYTES)
        with self._lock:
            self._images[image_id] = png
            self._bytes += len(png)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                _, old = self._images.popitem(last=False)
                self._bytes -= len(old)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        with self._lock:
            return self._images.get(image_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)
