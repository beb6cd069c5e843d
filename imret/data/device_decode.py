"""Decoding on the device (`data.decode: gpu`): the loader workers only read the tar and hand over each JPEG's
bytes; the whole batch is decoded in one batched nvJPEG call (torchvision's `decode_jpeg(list, device=...)`)
and resized there. A CPU decodes 500-700 photos a second per core, so one fast GPU would otherwise need
15-25 loader cores.

A batch's `image` is then a list: 1-d uint8 tensors (JPEG bytes) and, for the PNG or WebP samples that the
workers decoded on the CPU as before, 3-d uint8 tensors already at the loading size. The same call decodes on
the CPU with libjpeg, which is how the tests hold the two paths to each other.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from imret.errors import DataError, ImretError

log = logging.getLogger("imret.data")
_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


def resolve_decode(decode: str, device: torch.device) -> str:
    """auto: on the device when it is a CUDA GPU, else in the loader workers."""
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return decode


def check_decode_device(decode: str, device: torch.device) -> None:
    if decode == "gpu" and device.type != "cuda":
        raise ImretError(f"data.decode: gpu decodes with nvJPEG on a CUDA device, and this process runs on "
                         f"{device.type}: use data.decode=cpu (--decode cpu)")  # fmt: skip


def images_on_device(batch: dict, size: int, device: torch.device) -> torch.Tensor:
    """A batch's images as uint8 [B, 3, size, size] on `device`: a stacked tensor is copied, a list decoded."""
    if isinstance(batch["image"], torch.Tensor):
        return batch["image"].to(device, non_blocking=True)
    return decode_batch(batch["image"], batch["key"], size, device)


def decode_batch(encoded: list[torch.Tensor], keys: list[str], size: int, device: torch.device) -> torch.Tensor:
    jpegs = [i for i, item in enumerate(encoded) if item.dim() == 1]
    out: list[torch.Tensor | None] = [None] * len(encoded)
    decoded = decode_jpegs([encoded[i] for i in jpegs], [keys[i] for i in jpegs], device)
    for positions, resized in resize_by_shape(decoded, size):
        for position, image in zip(positions, resized):
            out[jpegs[position]] = image
    if len(jpegs) < len(encoded):
        say_once("data.decode: gpu: PNG and WebP samples are decoded on the CPU by the loader workers")
    for i, item in enumerate(encoded):
        if item.dim() == 3:
            out[i] = item.to(device, non_blocking=True)
    return torch.stack(out)


def resize_by_shape(images: list[torch.Tensor], size: int) -> list[tuple[list[int], torch.Tensor]]:
    """The images resized to size x size, those of one shape in one call (photos of a dataset often share a
    few shapes): [(their positions in `images`, uint8 [n, 3, size, size])]."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    return [(positions, resize(torch.stack([images[p] for p in positions]), size)) for positions in groups.values()]


def decode_jpegs(data: list[torch.Tensor], keys: list[str], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 [3, H, W] images. nvJPEG refuses a few encodings that libjpeg reads (some progressive or
    unusual subsampling files): then each image is tried alone, and what the device cannot decode is decoded
    on the CPU and copied over. The loader workers checked each JPEG's header, and the shard build decoded
    every image once, so a JPEG that libjpeg cannot decode either is a shard damaged since: an error."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    if device.type == "cuda":
        # torchvision allocates the outputs on the current stream but nvJPEG writes them on a stream of its own that
        # does not wait for this one (pytorch/vision#9606): memory freed by kernels still queued here (the previous
        # batch's resize) could be handed out and overwritten under them. Drain the queue first.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its batched nvJPEG call still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # which image: found one by one below
        images = []
        for item, key in zip(data, keys):
            try:
                images.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
                continue
            except RuntimeError as exc:
                if device.type != "cuda":
                    raise DataError(f"sample {key}: its JPEG does not decode ({exc}); run imret shards verify") from None
                say_once("data.decode: gpu: nvJPEG could not decode some JPEGs; those are decoded on the CPU")
            try:
                images.append(decode_jpeg(item, mode=ImageReadMode.RGB).to(device, non_blocking=True))
            except RuntimeError as exc:
                raise DataError(f"sample {key}: its JPEG does not decode ({exc}); run imret shards verify") from None
        return images


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] or [N, 3, H, W] uint8 to size x size, bilinear with antialiasing. Close to the CPU path, not equal:
    PIL first decodes a large JPEG at a reduced DCT scale (`draft`), then resizes (0-5 grey levels apart on
    average)."""
    if images.shape[-2:] == (size, size):
        return images
    batch = images if images.dim() == 4 else images[None]
    resized = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized if images.dim() == 4 else resized[0]
