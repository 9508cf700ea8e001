"""`dali`: an NVIDIA DALI pipeline over the pack's shards, read through their DALI index files.

With CUDA, JPEGs are decoded on `mixed` (nvJPEG, hardware decoder share `hw_decoder_load`, buffers
preallocated for the pack's image size) and every augmentation runs on the GPU; the HWC output
viewed as NCHW is a channels_last tensor without a copy (when the contiguous NCHW format is asked,
as on CPU, crop_mirror_normalize writes CHW instead). Without CUDA the same graph runs on CPU
threads (`device_id=None`).

Graph (train): read -> random-resized-crop (CPU: ROI decode of the window, fused, then resize; GPU:
whole-image decode on `mixed` then fn.random_resized_crop, see _decode_train) -> S x S -> rotate by a
whole-degree angle (keep size, black fill) -> flips by random coins -> fn.color_twist (brightness,
contrast pivoting at mid-gray as in the other loaders, hue in YIQ, saturation) -> normalize to
HWC float. On CPU with rotation, resize + rotate + flips run as one fn.warp_affine (one resampling
instead of two), and the graph ends in uint8: torch normalizes and casts the batch (cheaper than
crop_mirror_normalize + a float->bf16 cast on CPU); on GPUs the separate operators are cheap and stay.
Graph (eval): read -> decode -> resize shorter side to S -> center crop + normalize.

Differences from the other kinds, by design of DALI's reader:
- order: the reader shuffles within a buffer of `initial_fill` samples (train shards are written in
  a seeded random order, so this is enough); the order follows the pipeline seed (seed, rank), not
  `set_epoch`. Each rank reads its contiguous 1/w of the shards and moves to the next share every
  epoch (stick_to_shard=False), so ranks stay disjoint and together cover the split.
- train: every rank yields exactly len(loader) = (N // w) // batch_size batches (a share one sample
  longer than N // w may allow one more DALI batch: it is read and dropped to keep counts equal).
- eval: pad_last_batch + LastBatchPolicy.PARTIAL: every sample exactly once, shards identical to
  the other kinds (base.eval_share); a short rank splits its last batch like the others.
- class-balanced sampling is not available (the reader has no weighted sampler): build_loader
  refuses `dali` with balance_sampler on the train split.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from hamengine.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, AugPreset, LoaderConfig
from hamengine.errors import ConfigError
from hamengine.loaders.kinds import augment
from hamengine.loaders.kinds.base import Batch, Loader, eval_batch_sizes, mix_seed, verify_shards
from hamengine.loaders.pack.records import Pack, PackError

HW_DECODER_LOAD = 0.9  # share of JPEGs sent to the hardware decoder (NVIDIA's ResNet-50 example value)


def _decoder_padding(hint_hw: tuple[int, int]) -> int:
    """nvJPEG buffer padding in bytes for the pack's images: one decoded RGB image of the hinted
    size, doubled for larger images in the split, rounded up to 1 MiB. Buffers grow by at least
    this much when an image does not fit, so reallocation (a device sync) happens about once,
    not per batch. NVIDIA's ImageNet values (211 MB device / 140 MB host) would be waste here."""
    need = 2 * hint_hw[0] * hint_hw[1] * 3
    mib = 1 << 20
    return max(mib, -(-need // mib) * mib)


def _decode_train(jpg, aug: AugConfig, size: int, decode_kw: dict, *, whole_then_crop: bool):
    """The train decode + random-resized-crop step. CPU: ROI decode of the crop window (fused,
    decodes only the window). GPU (`whole_then_crop`): decode the whole image on `mixed`, then
    fn.random_resized_crop on the GPU, as NVIDIA's ResNet-50 example does -- ROI decode on
    `mixed` goes through nvImageCodec 0.9 (pinned by DALI 2.4), which fails with
    NVIMGCODEC_STATUS_INTERNAL_ERROR / SIGSEGV on ROI decodes (NVIDIA/nvImageCodec#55).
    The result is size x size in both cases."""
    from nvidia.dali import fn, types

    window = {"random_area": list(aug.scale), "random_aspect_ratio": list(aug.ratio), "num_attempts": 10}
    if whole_then_crop:
        images = fn.decoders.image(jpg, **decode_kw)
        return fn.random_resized_crop(images, size=[size, size], antialias=True,
                                      interp_type=types.INTERP_LINEAR, **window)
    return fn.decoders.image_random_crop(jpg, **window, **decode_kw)  # crop only; resized after


def _graph(paths: list[str], index_paths: list[str], *, train: bool, augment: bool, size: int,
           aug: AugConfig, cuda: bool, shard_id: int, num_shards: int, initial_fill: int,
           fp16: bool, hint_hw: tuple[int, int], layout: str = "HWC", keys: bool = False):
    from nvidia.dali import fn, types

    jpg, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        dtypes=[types.UINT8, types.UINT8], random_shuffle=train, initial_fill=initial_fill,
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=not train, name="reader")
    decode_kw: dict = {"device": "mixed" if cuda else "cpu", "output_type": types.RGB}
    if cuda:
        pad = _decoder_padding(hint_hw)
        decode_kw.update(hw_decoder_load=HW_DECODER_LOAD, preallocate_height_hint=hint_hw[0],
                         preallocate_width_hint=hint_hw[1], device_memory_padding=pad, host_memory_padding=pad)
    mean = [m * 255 for m in IMAGENET_MEAN]
    std = [s * 255 for s in IMAGENET_STD]
    # fp16: the engine trains in fp16 or bf16. DALI has no bfloat16 type; FP16 out halves the bytes
    # written and read, and finish() casts fp16 -> bf16 on the GPU (fp16 carries more mantissa bits
    # than bf16 and normalized pixels are far inside its range: nothing is lost vs an FP32 output).
    out_dtype = types.FLOAT16 if fp16 else types.FLOAT
    # On GPUs colour jitter and crop_mirror_normalize end the graph (float out, hflip inside cmn for
    # free). On CPU the graph ends after the geometry, in uint8 HWC, and torch applies jitter +
    # normalization to the whole batch as one 3x3 colour matrix (augment.colour_affine, the resident
    # loader's maths) and casts: ~0.4 ms/img instead of ~2 ms/img for color_twist + cmn on CPU.
    normalize = cuda
    if augment:
        images = _decode_train(jpg, aug, size, decode_kw, whole_then_crop=cuda)
        hcoin = fn.random.coin_flip(probability=0.5) if aug.hflip else None
        vcoin = fn.random.coin_flip(probability=0.5) if aug.vflip else None
        mirror = None
        if aug.rotation and not cuda:
            # CPU: resize + rotation + flips as ONE warp_affine (measured 4.1 vs 5.2 ms/img for
            # resize, rotate, flip, brightness_contrast, hsv as separate CPU operators)
            images = fn.warp_affine(images, matrix=_crop_rotate_flip_matrix(images, size, hcoin, vcoin),
                                    size=[size, size], fill_value=0, interp_type=types.INTERP_LINEAR)
        else:
            if not cuda:  # the GPU path's random_resized_crop already output S x S
                images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            if aug.rotation:
                images = fn.rotate(images, angle=_whole_degrees(), keep_size=True, fill_value=0,
                                   interp_type=types.INTERP_LINEAR)
            if normalize:
                mirror = hcoin  # horizontal flip for free inside crop_mirror_normalize
                hcoin = None
            if hcoin is not None or vcoin is not None:  # fn.flip's default flips always: pass coins
                images = fn.flip(images, horizontal=hcoin if hcoin is not None else 0,
                                 vertical=vcoin if vcoin is not None else 0)
        if aug.has_jitter and normalize:  # brightness, contrast (pivot 127.5), hue (YIQ), saturation
            images = fn.color_twist(
                images, brightness=_factor(aug.brightness), contrast=_factor(aug.contrast),
                saturation=_factor(aug.saturation),
                hue=fn.random.uniform(range=[-360.0 * aug.hue, 360.0 * aug.hue]) if aug.hue > 0 else 0.0)
        if normalize:
            cmn_kw = {"mirror": mirror} if mirror is not None else {}
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout=layout, mean=mean,
                                              std=std, **cmn_kw)
    else:
        images = fn.decoders.image(jpg, **decode_kw)
        # torchvision's exact eval geometry (what the torch and resident loaders do): longer side
        # int(S * long / short), center-crop offset round-half-even((side - S) / 2). DALI's own
        # resize_shorter / crop_pos round differently and shift small images by a pixel.
        (ry, rx), (ay, ax) = _eval_geometry(jpg, size)
        images = fn.resize(images, resize_x=rx, resize_y=ry, antialias=True)
        images = fn.slice(images, fn.stack(ay, ax), (size, size), axes=[0, 1])
        if normalize:
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout=layout, mean=mean,
                                              std=std)
    # `.cls` holds the class index as ASCII digits (one digit: <= 10 classes, checked at build)
    label = fn.cast(cls[0], dtype=types.INT64) - 48
    if cuda:
        label = label.gpu()
    if keys:
        # The reader picks the order (shuffle buffer), so the metadata rows are found by sample key:
        # source_info is "SHARD.tar:OFFSET:KEY.jpg", padded with NULs to a dense uint8 [N, L] batch
        # that stays on the CPU (it is read on the host, never crosses to the GPU).
        return images, label, fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)
    return images, label


def _whole_degrees():
    """Rotation angle in whole degrees, uniform over 0..359 (as augment.sample_params draws it)."""
    from nvidia.dali import fn

    return fn.random.uniform(values=[float(d) for d in range(360)])


def _factor(x: float):
    from nvidia.dali import fn

    return fn.random.uniform(range=[max(0.0, 1 - x), 1 + x]) if x > 0 else 1.0


def _crop_rotate_flip_matrix(images, size: int, hcoin, vcoin):
    """Per-sample 2x3 dst->src matrix: output S x S, rotated about its center by a whole-degree
    angle and flipped, mapped onto the decoded crop (h x w). Corners from outside the crop: black."""
    import math

    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = fn.cast(images.shape(), dtype=types.FLOAT)  # H, W, C of each decoded crop
    h, w = shape[0], shape[1]
    rad = _whole_degrees() * (math.pi / 180)
    c, s = dmath.cos(rad), dmath.sin(rad)
    fx = 1.0 - 2.0 * fn.cast(hcoin, dtype=types.FLOAT) if hcoin is not None else 1.0
    fy = 1.0 - 2.0 * fn.cast(vcoin, dtype=types.FLOAT) if vcoin is not None else 1.0
    sx, sy = w / size, h / size
    a00, a01 = sx * c * fx, -sx * s * fy  # diag(w/S, h/S) . R . diag(fx, fy)
    a10, a11 = sy * s * fx, sy * c * fy
    tx = w * 0.5 - (a00 + a01) * (size * 0.5)  # output center -> crop center
    ty = h * 0.5 - (a10 + a11) * (size * 0.5)
    return fn.reshape(fn.stack(a00, a01, tx, a10, a11, ty), shape=[2, 3])


def _eval_geometry(jpg, size: int):
    """Per-sample (resize y, x) floats and (crop anchor y, x) ints, computed on the CPU from the
    JPEG header (fn.peek_image_shape): no decode needed, works for both CPU and mixed decoding."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = fn.peek_image_shape(jpg)  # H, W, C
    h = fn.cast(shape[0], dtype=types.FLOAT)
    w = fn.cast(shape[1], dtype=types.FLOAT)
    short = dmath.min(h, w)
    ry, rx = dmath.floor(size * h / short), dmath.floor(size * w / short)

    def center(side):
        d = fn.cast(side, dtype=types.INT32) - size
        k = d // 2
        return k + (d - 2 * k) * (k - 2 * (k // 2))  # int32, round half to even

    return (ry, rx), (center(ry), center(rx))


def _probe_dali() -> None:
    """Import DALI and build + run a one-sample CPU pipeline: an installed wheel whose native
    library cannot load (wrong CUDA/glibc, broken install) fails here, not at the first batch."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def probe():
        return fn.cast(fn.external_source(source=lambda: np.zeros((2,), np.uint8), batch=False),
                       dtype=types.FLOAT)

    pipe = probe()
    pipe.build()
    pipe.run()


@functools.lru_cache(maxsize=1)
def dali_status() -> str:
    """'' when DALI imports and runs a pipeline, else why not (cached: probed once per process)."""
    try:
        _probe_dali()
    except Exception as e:  # ImportError, RuntimeError from the native library, anything: not usable
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {first}"
    return ""


def dali_available() -> bool:
    return dali_status() == ""


class DaliLoader(Loader):
    kind = "dali"

    def __init__(self, pack: Pack, split: str, cfg: LoaderConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1, workers: int = 2, verify: bool = True):
        super().__init__(pack, split, cfg, device, rank, world_size)
        if not dali_available():
            raise ConfigError(f"loader 'dali' needs a working NVIDIA DALI ({dali_status()}); install "
                              "nvidia-dali-cuda130 or use --loader resident/torch")
        if verify:
            verify_shards(pack, split)
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.balance:
            raise ConfigError("loader 'dali' cannot do class-balanced sampling (balance_sampler): its reader "
                              "has no weighted sampler; use --loader resident or torch, or --balance loss")
        if len(pack.classes) > 10:
            raise PackError(f"{pack.path}: {len(pack.classes)} classes; the dali loader reads one-digit labels")
        shards = pack.shards(split)
        cuda = self.device.type == "cuda"
        self.augment = self.train and self.aug.preset != AugPreset.NONE
        hint = _image_hw(pack, split)
        # HWC viewed as NCHW is channels_last for free; for a contiguous NCHW output on a GPU let
        # crop_mirror_normalize write CHW in the pass it makes anyway. CPU graphs end in uint8 HWC.
        self.layout = "CHW" if self.memory_format == torch.contiguous_format and cuda else "HWC"
        self.torch_normalize = not cuda
        graph = pipeline_def(_graph, enable_conditionals=False)
        seed = mix_seed(cfg.seed, rank, 0xDA1) % (2**31 - 1)
        self.pipe = graph(
            [str(s.path) for s in shards], [str(s.idx_path) for s in shards], train=self.train,
            augment=self.augment, size=self.size, aug=self.aug, cuda=cuda, shard_id=rank,
            num_shards=world_size, initial_fill=max(self.batch_size, min(1024, self.total_samples)),
            fp16=cuda and self.dtype in (torch.float16, torch.bfloat16), hint_hw=hint, layout=self.layout,
            batch_size=self.batch_size, num_threads=max(1, workers),
            device_id=(self.device.index or 0) if cuda else None, seed=seed, prefetch_queue_depth=2,
            keys=cfg.meta)
        try:
            self.pipe.build()
        except RuntimeError as e:  # a damaged index or shard: say which pack, before the first batch
            raise PackError(f"{pack.path}: DALI cannot open the {split} shards: {str(e).splitlines()[0]}") from None
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        outputs = ["images", "labels"] + (["keys"] if cfg.meta else [])
        self._key_index = {k: i for i, k in enumerate(pack.keys(split))} if cfg.meta else {}
        self._it = DALIGenericIterator(self.pipe, outputs, reader_name="reader",
                                       last_batch_policy=policy, auto_reset=True)
        self._mid_epoch = False
        self._bufs: dict[str, torch.Tensor] = {}
        self._batch_no = 0

    def _batches(self) -> Iterator[Batch]:
        if self._mid_epoch:  # the consumer left the last epoch early: DALI resets only at an epoch's end
            for _ in _drain(self._it):
                pass
        self._mid_epoch = True
        for out in _drain(self._it):
            d = out[0]
            yield d["images"], d["labels"].reshape(-1), d.get("keys")
        self._mid_epoch = False

    def _meta_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Metadata rows [n, M] of a batch from its source_info strings (uint8 [n, L], NUL-padded)."""
        idx = []
        for row in keys.cpu().numpy():
            info = row.tobytes().rstrip(b"\0").decode()
            name = info.rsplit(":", 1)[-1]  # KEY.jpg
            idx.append(self._key_index[name[: -len(".jpg")] if name.endswith(".jpg") else name])
        return self.meta_rows(np.asarray(idx, dtype=np.int64))

    def __iter__(self) -> Iterator[Batch]:
        want = len(self)
        sizes = [self.batch_size] * want if self.train else eval_batch_sizes(
            self.total_samples, self.rank, self.world_size, self.batch_size)
        k = 0
        for images, labels, keys in self._batches():  # images: N,S,S,3 (HWC) or N,3,S,S (CHW)
            if k >= want:
                continue  # drain: DALI resets only at its epoch's end
            nchw = images.permute(0, 3, 1, 2) if self.layout == "HWC" else images  # HWC: channels_last view
            if self.torch_normalize:  # uint8 from the CPU graph
                nchw = self._colour_normalize(nchw)
            # split DALI's batch where the plan wants smaller ones (a short eval rank's last batch)
            meta = self._meta_of(keys) if keys is not None else None
            pos = 0
            while pos < nchw.shape[0] and k < want:
                take = sizes[k]
                out = self.finish(nchw[pos:pos + take]), labels[pos:pos + take].to(self.device, torch.int64)
                yield out if meta is None else (*out, meta[pos:pos + take])
                pos += take
                k += 1
        while k < want:  # only with batch_size 1 and uneven shares: an empty last batch
            s = self.size
            out = (self.finish(torch.empty(0, 3, s, s, device=self.device)),
                   torch.empty(0, dtype=torch.int64, device=self.device))
            yield out if self.meta_table is None else (*out, self.meta_rows(np.zeros(0, np.int64)))
            k += 1

    def _colour_normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """CPU graphs: uint8 [N, 3, S, S] (an NHWC view) -> jittered (train), normalized, cast.
        Jitter factors come from a generator seeded by (seed, rank, batch number)."""
        n, s = x_u8.shape[0], self.size
        x = self._bufs.get("x")
        if x is None or x.shape[0] != n:
            x = self._bufs["x"] = torch.empty((n, 3, s, s), dtype=torch.float32)
        x.copy_(x_u8)  # NHWC uint8 -> NCHW float, reused buffer
        self._batch_no += 1
        if self.augment and self.aug.has_jitter:
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.rank, self._batch_no, 0xC01))
            p = augment.sample_params(gen, n, s, s, self.aug)
            m, t = augment.colour_affine(p, None, n, x.device)
            y = self._bufs.get("y")
            if y is None or y.shape != x.shape:
                y = self._bufs["y"] = torch.empty_like(x)
            y = augment.apply_colour(x, m, t, clamp=True, out=y)
        else:
            a, b = augment.normalize_coefficients(x.device)
            y = x.mul_(a).add_(b)
        return y.to(dtype=self.dtype, memory_format=self.memory_format, copy=True)  # never hand out the buffer

    def close(self) -> None:
        self._it = None
        self.pipe = None


def _drain(it) -> Iterator:
    """next() until StopIteration (auto_reset then rewinds); `for` would call iter(), which warns."""
    while True:
        try:
            yield next(it)
        except StopIteration:
            return


def _image_hw(pack: Pack, split: str) -> tuple[int, int]:
    """(h, w) of the split's first image: the decoder's preallocation hint."""
    from torchvision.io import decode_jpeg

    if pack.num_samples(split) == 0:
        return pack.image_size, pack.image_size
    img = decode_jpeg(torch.frombuffer(bytearray(pack.jpeg(split, 0)), dtype=torch.uint8))
    return int(img.shape[1]), int(img.shape[2])


__all__ = ["DaliLoader"]
