"""GPU-memory tier (where CUDA exists): payloads as ``uint8`` tensors on the device."""

from __future__ import annotations

from .base import Store, StoreError, checksum64, validate_key


class DeviceMemoryStore(Store):
    """GPU-memory tier: payloads kept as ``uint8`` tensors on a CUDA device (checksummed on put,
    verified on get with ``verify=True``). Needs torch with CUDA; raises :class:`StoreError` if
    the device is unusable."""

    name = "gpu"

    def __init__(self, device: str = "cuda", *, verify: bool = False):
        import torch

        if not torch.cuda.is_available():
            raise StoreError("no CUDA device for the GPU memory tier")
        self.device = torch.device(device)
        self.verify = verify
        self._items: dict[str, tuple[object, int]] = {}

    async def get(self, key: str) -> bytes | None:
        validate_key(key)
        item = self._items.get(key)
        if item is None:
            return None
        data = item[0].cpu().numpy().tobytes()
        if self.verify and checksum64(data) != item[1]:
            self._items.pop(key, None)
            return None
        return data

    async def put(self, key: str, value: bytes) -> None:
        import torch

        validate_key(key)
        buf = torch.frombuffer(bytearray(value), dtype=torch.uint8).to(self.device)
        self._items[key] = (buf, checksum64(value))

    async def contains(self, key: str) -> bool:
        validate_key(key)
        return key in self._items

    async def delete(self, key: str) -> bool:
        validate_key(key)
        return self._items.pop(key, None) is not None

    async def close(self) -> None:
        self._items.clear()

    async def sizes(self) -> dict[str, int]:
        return {k: int(t.numel()) for k, (t, _c) in self._items.items()}
