"""An image processing service on Pillow: CPU-bound work, meant for a pool of workers."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from PIL import Image, ImageFilter, ImageOps

from titan_broker import Health, health_check, metric, process, public

FILTERS: dict[str, ImageFilter.Filter | type[ImageFilter.Filter]] = {
    "blur": ImageFilter.GaussianBlur(2),
    "sharpen": ImageFilter.SHARPEN,
    "edges": ImageFilter.FIND_EDGES,
    "smooth": ImageFilter.SMOOTH,
    "contour": ImageFilter.CONTOUR,
}


def _open(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise ValueError(f"not an image Pillow can read: {exc}") from None
    return image


def _save(image: Image.Image, fmt: str, quality: int = 85) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(out, format=fmt, quality=quality)
    return out.getvalue()


def _filter(image: Image.Image, name: str) -> Image.Image:
    if name == "grayscale":
        return ImageOps.grayscale(image)
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; use one of grayscale, {', '.join(FILTERS)}")
    return image.convert("RGB").filter(FILTERS[name])


@process(name="image-processor", version="1.0.0")
class ImageProcessor:
    """Resize, crop, rotate, filter and compress images passed as bytes."""

    async def init(self, max_pixels: int = 40_000_000) -> None:
        self.max_pixels = max_pixels
        self.processed = 0
        self.errors = 0
        self.total_ms = 0.0

    def _timed(self, work: Any) -> Any:
        started = time.perf_counter()
        try:
            result = work()
        except Exception:
            self.errors += 1
            raise
        self.processed += 1
        self.total_ms += (time.perf_counter() - started) * 1000
        return result

    def _apply(self, job: dict[str, Any]) -> dict[str, Any]:
        image = _open(job["image"])
        if image.width * image.height > self.max_pixels:
            raise ValueError(
                f"image of {image.width}x{image.height} is over the limit of {self.max_pixels} pixels"
            )
        fmt = str(job.get("format") or image.format or "PNG").upper()
        quality = 85
        for step in job.get("operations", []):
            op = step.get("op")
            if op == "resize":
                image = image.resize((int(step["width"]), int(step["height"])))
            elif op == "crop":
                left, top, right, bottom = (int(v) for v in step["box"])
                image = image.crop((left, top, right, bottom))
            elif op == "rotate":
                image = image.rotate(float(step["degrees"]), expand=True)
            elif op == "filter":
                image = _filter(image, str(step["name"]))
            elif op == "compress":
                fmt, quality = "JPEG", int(step.get("quality", 75))
            else:
                raise ValueError(f"unknown operation {op!r}; use resize, crop, rotate, filter or compress")
        data = _save(image, fmt, quality)
        return {"id": job.get("id"), "image": data, "width": image.width, "height": image.height,
                "format": fmt, "bytes": len(data)}  # fmt: skip

    @public
    @metric
    async def process_image(self, job: dict[str, Any]) -> dict[str, Any]:
        """Apply ``job["operations"]`` in order to ``job["image"]`` (bytes)."""
        return await anyio.to_thread.run_sync(lambda: self._timed(lambda: self._apply(job)))

    @public
    async def process_batch(self, jobs: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """Process the jobs at once, streaming each result (or its error) as it finishes."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](len(jobs) or 1)

        async def one(job: dict[str, Any], results: MemoryObjectSendStream[dict[str, Any]]) -> None:
            async with results:
                try:
                    result = await anyio.to_thread.run_sync(lambda: self._timed(lambda: self._apply(job)))
                except Exception as exc:
                    result = {"id": job.get("id"), "error": f"{type(exc).__name__}: {exc}"}
                await results.send(result)

        # The worker drives this generator from one task and closes it there, so the
        # task group may stay open across the yields.
        async with anyio.create_task_group() as tg:
            async with send:
                for job in jobs:
                    tg.start_soon(one, job, send.clone())
            async with receive:
                async for result in receive:
                    yield result

    @public
    @metric
    async def generate_thumbnail(self, image: bytes, size: int = 128) -> bytes:
        def work() -> bytes:
            picture = _open(image)
            picture.thumbnail((size, size))
            return _save(picture, "PNG")

        return await anyio.to_thread.run_sync(lambda: self._timed(work))

    @public
    async def apply_filter(self, image: bytes, name: str) -> bytes:
        def work() -> bytes:
            return _save(_filter(_open(image), name), "PNG")

        return await anyio.to_thread.run_sync(lambda: self._timed(work))

    @public
    async def get_stats(self) -> dict[str, Any]:
        total = self.processed + self.errors
        return {
            "processed": self.processed,
            "errors": self.errors,
            "average_ms": round(self.total_ms / self.processed, 3) if self.processed else None,
            "error_rate": round(self.errors / total, 4) if total else 0.0,
        }

    @health_check
    async def health(self) -> Health:
        total = self.processed + self.errors
        rate = self.errors / total if total else 0.0
        return Health("degraded" if rate > 0.5 else "healthy", checks={"error_rate": round(rate, 4)})
