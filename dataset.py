"""ImageNet data for training MobileNetV3: the datasets, their transforms, the sampler and the loader.

ImageFiles (training, decoded in the loader workers), ValidationImageFiles (an unreadable image left out, never
replaced) and EncodedImageFiles (--decode-on device: JPEGs decoded on the training device) give uint8 images of
a layouts.FileIndex; normalize_batch makes the floats on the device; EpochSampler orders an epoch by (seed,
epoch) alone, so a resume sees the same batches; build_loader batches them. Where the files are: layouts.py; how
they are decoded: decode.py; bad files, speed and the measurements: docs/data-pipeline.md.
"""
import atexit
import contextlib
import functools
import multiprocessing
import os
import signal
import weakref
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import decode
from utils import DataError, ignore_stop_signals, warn

NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # mean and std of the 2021 predecessor of this repository, for models trained with it
    "legacy": ((0.4547857, 0.4349471, 0.40525291), (0.12003352, 0.12323549, 0.1392444)),
}
MAX_BAD_IN_A_ROW = 50  # then the data is broken, not a file
SKIP_COUNTER_SLOTS = 256  # one per DataLoader worker process, plus the main process


# ----------------------------------------------------------------------------------------------------------
# Datasets: decoded and augmented samples


@contextlib.contextmanager
def sample_rng(seed):
    """torch's CPU generator seeded with a sample's seed inside the block, put back as it was after (with workers=0
    this runs in the training process); seed None leaves it alone."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def worker_slot():
    """Which entry of a per-process counter this process may write: 0 in the main process, then one per worker."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (SKIP_COUNTER_SLOTS - 1)


class ImageFiles(torch.utils.data.Dataset):
    """The images of a FileIndex, decoded and transformed: (uint8 tensor (3, H, W), label).

    An item is an index, or (index, sample seed) from EpochSampler: the transform then runs seeded with it, so
    augmentation does not depend on the worker, and a resumed epoch sees the same images. A file that can't be
    decoded raises DataError when strict; else it is warned about, counted in `skipped` (each time it is read)
    and replaced by the next readable file, so the batch keeps its size.

    scaled_decoding, when the transform starts with a bilinear RandomResizedCrop (train_transform's does): the
    crop box is drawn first, with the transform's own random calls, and a JPEG whose box is at least twice the
    output is decoded at a DCT scale (decode.decode_jpeg_crop_reduced). Same box, flip and later steps as a full
    decode.
    """

    def __init__(self, index, transform, strict=False, scaled_decoding=True):
        self.index = index
        self.transform = transform
        self.strict = strict
        steps = getattr(transform, "transforms", [])
        self.crop = None  # the RandomResizedCrop that scaled decoding does itself, then the steps after it
        if (scaled_decoding and steps and isinstance(steps[0], v2.RandomResizedCrop) and steps[0].antialias
                and getattr(steps[0].interpolation, "value", steps[0].interpolation) == "bilinear"
                and (decode.torchcodec_decode_jpeg is not None or decode.decode_jpeg is not None)):
            self.crop, self.after_crop = steps[0], v2.Compose(steps[1:])
        # shared memory, so the main process sees the workers' counts; one slot per process, never written by two
        self.skip_counts = torch.zeros(SKIP_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.index)

    @property
    def skipped(self):
        return int(self.skip_counts.sum())

    def __getitem__(self, item):
        position, seed = item if isinstance(item, tuple) else (item, None)
        if self.crop is not None:
            with sample_rng(seed):
                start = torch.random.get_rng_state()

                def read(path):  # each file tried starts from the sample's random state, as transform(image) does
                    torch.random.set_rng_state(start)
                    return self.read_cropped(path)

                image, label, _ = self.load(position, read=read)
                return self.after_crop(image), label
        image, label, _ = self.load(position)
        if self.transform is not None:
            with sample_rng(seed):
                image = self.transform(image)
        return image, label

    def read_cropped(self, path):
        """The file at path, decoded and put through RandomResizedCrop, with scaled decoding where it applies."""
        data, size = decode.read_image_file(path)
        if size is None:  # decoded by PIL already
            return self.crop(data)
        box = decode.draw_crop_box(self.crop, size)
        scale = decode.dct_scale(box[2], box[3], *self.crop.size)
        if scale > 1:
            image = decode.decode_jpeg_crop_reduced(data, scale, box, self.crop.size)
            if image is not None:
                return image
        return v2.functional.resized_crop(decode.decode_jpeg_cpu(data), *box, self.crop.size, antialias=True)

    def load(self, position, read=decode.decode_image_file):
        """(read(path), label, position read) for the file at position, or for the next readable one after it."""
        for offset in range(min(MAX_BAD_IN_A_ROW, len(self.index))):
            i = (position + offset) % len(self.index)
            try:
                return read(self.index.path(i)), int(self.index.labels[i]), i
            except decode.DECODE_ERRORS as error:
                self.report_bad_file(self.index.path(i), error)
        raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row, from {self.index.path(position)}")

    def report_bad_file(self, path, error):
        if self.strict:
            raise DataError(f"cannot read image {path}: {decode.bad_file_reason(error)}") from None
        warn(f"skipping unreadable image {path}: {decode.bad_file_reason(error)}")
        self.skip_counts[worker_slot()] += 1

    def batch_to(self, device, images, labels):
        """A batch from the loader, on the training device: (uint8 images (N, 3, H, W), labels)."""
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class ValidationImageFiles(ImageFiles):
    """Validation images: an unreadable file is left out of its batch, never replaced, so every image is scored
    once with its own label (a batch may come out smaller, or empty; build_loader takes the collate). It is warned
    about once however many passes read it, and marked in `unreadable` (shared memory) for unreadable_files()."""

    def __init__(self, index, transform, strict=False):
        super().__init__(index, transform, strict)
        self.unreadable = torch.zeros(len(index), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self):
        return int(self.unreadable.sum())

    def unreadable_files(self):
        """Paths of the files found unreadable so far, in index order."""
        return [self.index.path(i) for i in self.unreadable.nonzero().flatten().tolist()]

    def __getitem__(self, item):
        """(uint8 image, label), or None for an unreadable file (left out by collate)."""
        position = item[0] if isinstance(item, tuple) else item
        path = self.index.path(position)
        try:
            image = decode.decode_image_file(path)
        except decode.DECODE_ERRORS as error:
            if self.strict:
                raise DataError(f"cannot read image {path}: {decode.bad_file_reason(error)}") from None
            if not self.unreadable[position]:
                warn(f"leaving out unreadable validation image {path}: {decode.bad_file_reason(error)}")
            self.unreadable[position] = 1
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.index.labels[position])

    @staticmethod
    def collate(samples):
        kept = [sample for sample in samples if sample is not None]
        if not kept:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.utils.data.default_collate(kept)


@dataclass
class EncodedBatch:
    """A batch of EncodedImageFiles in few tensors (each tensor a worker sends costs a file descriptor): the JPEGs'
    bytes end to end, their lengths (0 for an image the worker finished), the finished images, and each sample's
    plan [position, top, left, height, width, flip]."""
    jpeg_bytes: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    plans: torch.Tensor


class EncodedImageFiles(ImageFiles):
    """Training samples decoded on the training device (train.py --decode-on device), for machines with few CPU
    cores per GPU. The workers only read each file and draw its crop box and flip with train_transform's random
    calls; batch_to decodes the batch's JPEGs in one call on the device and crops, resizes and flips them there.
    At full size, so on the CPU the images equal ImageFiles' with train_transform and scaled_decoding=False. Files
    nvjpeg can't take (not JPEG, CMYK) are decoded and cropped in the worker."""

    DEVICE_JPEG_MODES = ("RGB", "L")  # nvjpeg, through torchvision at least, does not take CMYK

    def __init__(self, index, img_size, min_scale=0.08, strict=False):
        super().__init__(index, transform=None, strict=strict)
        if decode.torchcodec_decode_jpeg is None and decode.decode_jpeg is None:
            raise DataError("decoding on the device needs torchcodec or torchvision.io.decode_jpeg; neither imports")
        self.img_size = img_size
        # train_transform's own steps, so that the crop and flip are drawn exactly as there
        self.crop, self.flip = train_transform(img_size, min_scale=min_scale).transforms

    def __getitem__(self, item):
        """(file bytes, 1-D, or the finished image (3, S, S); plan; label)."""
        position, seed = item if isinstance(item, tuple) else (item, None)
        read = functools.partial(decode.read_image_file, jpeg_modes=self.DEVICE_JPEG_MODES)
        (data, size), label, position = self.load(position, read=read)
        image_size = size or tuple(data.shape[-2:])
        with sample_rng(seed):  # train_transform's random calls, in its order: the crop box, then the flip
            box = decode.draw_crop_box(self.crop, image_size)
            flip = bool(torch.rand(1) < self.flip.p)
        plan = torch.tensor([position, *box, flip])
        if size is None:  # already decoded by PIL: finish it here
            data = self.crop_resize_flip(data, plan)
        return data, plan, label

    def crop_resize_flip(self, image, plan):
        top, left, height, width, flip = plan[1:].tolist()
        image = v2.functional.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                                           antialias=True)
        return v2.functional.horizontal_flip(image) if flip else image

    def collate(self, samples):
        data, plans, labels = zip(*samples)
        jpegs = [d for d in data if d.dim() == 1]
        finished = [d for d in data if d.dim() == 3]
        return EncodedBatch(
            jpeg_bytes=torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
            lengths=torch.tensor([len(d) if d.dim() == 1 else 0 for d in data]),
            finished=torch.stack(finished) if finished else torch.empty(0, 3, self.img_size, self.img_size,
                                                                         dtype=torch.uint8),
            plans=torch.stack(plans)), torch.tensor(labels)

    def batch_to(self, device, batch, labels):
        """Decode the batch's JPEGs on the device, then crop, resize and flip each: (uint8 (N, 3, S, S), labels).
        An image that fails to decode is reported like a bad file and replaced by the batch's previous good one."""
        rows = batch.lengths.nonzero().flatten().tolist()
        jpegs = torch.split(batch.jpeg_bytes, batch.lengths[rows].tolist())
        decoded = dict(zip(rows, self.decode_jpegs(list(jpegs), batch.plans[rows, 0].tolist(), device)))
        images = torch.empty(len(labels), 3, self.img_size, self.img_size, dtype=torch.uint8, device=device)
        finished = iter(batch.finished.to(device, non_blocking=True))
        good = []
        for i, plan in enumerate(batch.plans):
            if i not in decoded:
                images[i] = next(finished)
            elif decoded[i] is not None:
                images[i] = self.crop_resize_flip(decoded[i], plan)
            else:
                continue
            good.append(i)
        labels = labels.clone()
        if not good:  # (a batch of 1, say) the next readable file of the index, decoded here and squashed to size
            image, labels[0], _ = self.load(int(batch.plans[0, 0]) + 1)
            images[0] = v2.functional.resize(image, [self.img_size, self.img_size], antialias=True).to(device)
            good.append(0)
        for i in sorted(set(range(len(labels))) - set(good)):
            source = max((j for j in good if j < i), default=good[0])  # the previous good image, else the first
            images[i], labels[i] = images[source], labels[source]
        return images, labels.to(device, non_blocking=True)

    def decode_jpegs(self, jpegs, positions, device):
        """Decoded images on device (None for a file that can't be decoded): the whole list in one call, and one
        by one only when that call fails (a batched decode stops at its first broken file)."""
        if not jpegs:
            return []
        try:
            return decode.decode_jpegs_on(device, jpegs)
        except RuntimeError as error:
            if decode.is_device_failure(error):
                raise
        images = []
        for data, position in zip(jpegs, positions):
            try:
                images.append(decode.decode_jpegs_on(device, [data])[0])
                continue
            except RuntimeError as error:
                if decode.is_device_failure(error):
                    raise
                reason = error
            try:  # libjpeg-turbo reads some files nvjpeg refuses
                image = decode.decode_jpeg_cpu(data)
            except RuntimeError:
                images.append(None)
                self.report_bad_file(self.index.path(position), reason)
                continue
            images.append(image.to(device))
        return images

    @staticmethod
    def check_device(device):
        """Raise DataError unless JPEGs can be decoded on device here (nvjpeg on CUDA)."""
        decode.device_jpeg_decoder(device)


# ----------------------------------------------------------------------------------------------------------
# Transforms: they run in the DataLoader workers on uint8 tensors; normalize_batch makes floats on the device.


def train_transform(img_size, auto_augment=None, random_erase=0.0, norm="imagenet", min_scale=0.08):
    """Inception-style random crop and flip, then optionally RandAugment ("ra"), TrivialAugmentWide ("ta_wide")
    or AutoAugment's ImageNet policy ("imagenet"), then optionally random erasing with probability random_erase.
    """
    steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if auto_augment == "ra":
        steps.append(v2.RandAugment())
    elif auto_augment == "ta_wide":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment == "imagenet":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif auto_augment:
        raise ValueError(f"unknown auto_augment {auto_augment!r}: use 'ra', 'ta_wide' or 'imagenet'")
    if random_erase > 0:  # with the mean colour, which normalize_batch turns into (almost exactly) zero
        mean_colour = [round(255 * value) for value in NORMS[norm][0]]
        steps.append(v2.RandomErasing(p=random_erase, value=mean_colour))
    return v2.Compose(steps)


def val_transform(resize_size, crop_size):
    """Resize the shorter side to resize_size, then take the centre crop (usually resize = crop / 0.875)."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])


@functools.lru_cache(maxsize=8)
def normalization_constants(mean, std, device):
    """255 * mean and 1 / (255 * std), made once per device (a new GPU tensor per batch is a copy that waits)."""
    mean_255 = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
    return mean_255, scale


def normalize_batch(images, mean, std, channels_last=False):
    """uint8 (N, 3, H, W) batch -> float, scaled to [0, 1] and normalized, on the batch's device."""
    # (x / 255 - mean) / std, written as (x - 255 mean) * 1 / (255 std): two in-place passes over one new tensor
    mean_255, scale = normalization_constants(tuple(mean), tuple(std), images.device)
    if channels_last:  # reordered as uint8, a quarter of the bytes; float() and the in-place ops keep the order
        images = images.contiguous(memory_format=torch.channels_last)
    return images.float().sub_(mean_255).mul_(scale)


def make_mixup_cutmix(mixup_alpha, cutmix_alpha, num_classes):
    """A callable (normalized float images, int labels) -> (images, soft labels), or None when both alphas are 0.
    With both, each batch gets MixUp or CutMix, chosen at random."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


# ----------------------------------------------------------------------------------------------------------
# Sampling and loading


class EpochSampler(torch.utils.data.Sampler):
    """The order of one rank's samples in an epoch, a function of (seed, epoch) only.

    shuffle=True (training): a permutation seeded with seed + epoch, rank r taking positions r, r + num_replicas,
    ..., padded by wrapping around (or cut, with drop_last) so every rank gets as many, as DistributedSampler does;
    items are (index, sample seed), the seed for the sample's augmentation. shuffle=False (validation): rank r
    takes indices r, r + num_replicas, ... unpadded, so every image counts once; items are plain indices.
    set_epoch(epoch, skip_batches, batch_size) skips the rank's first batches unloaded, to resume mid-epoch.
    """

    def __init__(self, num_samples, shuffle, seed=0, num_replicas=1, rank=0, drop_last=False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = self.skip = 0

    def set_epoch(self, epoch, skip_batches=0, batch_size=1):
        self.epoch = epoch
        self.skip = skip_batches * batch_size

    def rank_length(self):
        if not self.shuffle:
            return len(range(self.rank, self.num_samples, self.num_replicas))
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)  # ceiling division

    def __len__(self):
        return max(0, self.rank_length() - self.skip)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank + self.skip * self.num_replicas, self.num_samples, self.num_replicas))
        total = self.rank_length() * self.num_replicas
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(0, 2**62, (total,), generator=generator)
        if total > self.num_samples:  # pad by wrapping around
            order = order.repeat(-(-total // self.num_samples))
        mine = slice(self.rank + self.skip * self.num_replicas, total, self.num_replicas)
        return zip(order[:total][mine].tolist(), seeds[mine].tolist())


# This module's loader worker processes, for end_loader_workers; weak, so a worker is forgotten with its loader.
loader_workers = weakref.WeakSet()
ending_loader_workers_at_exit = False  # end_loader_workers is registered with atexit (once, by build_loader)


class Loader(DataLoader):
    """A DataLoader that records its worker processes in `loader_workers`."""

    def __iter__(self):
        iterator = super().__iter__()
        # torch's multi-process iterator has started all its workers by now; the single-process one has none
        loader_workers.update(getattr(iterator, "_workers", ()))
        return iterator


def end_loader_workers():
    """At exit, kill the loader workers still alive (only them): they ignore SIGTERM (start_worker), with which
    multiprocessing's exit handler ends daemon children before it waits for them, forever."""
    workers = [child for child in multiprocessing.active_children() if child in loader_workers]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would call their end an error
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join()


def build_loader(dataset, sampler, batch_size, workers, train, pin_memory=False, worker_nice=0):
    """The DataLoader for training (train=True: incomplete last batch dropped) or validation. worker_nice > 0
    lowers the workers' priority; train.py and evaluate.py keep 0 (docs/data-pipeline.md, run E)."""
    global ending_loader_workers_at_exit
    worker_options = {}
    if workers > 0:
        # Workers stay alive across epochs; 4 batches in flight each is cheap with uint8 images.
        worker_options = {"persistent_workers": True, "prefetch_factor": 4}
        if not ending_loader_workers_at_exit:
            # atexit runs the last registered first: this runs before multiprocessing's handler (registered
            # when torch imported multiprocessing.util)
            atexit.register(end_loader_workers)
            ending_loader_workers_at_exit = True
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                  pin_memory=pin_memory, collate_fn=getattr(dataset, "collate", None),
                  worker_init_fn=functools.partial(start_worker, worker_nice),
                  # seeds torch, random and numpy in each worker the same way every run
                  generator=torch.Generator().manual_seed(getattr(sampler, "seed", 0)),
                  **worker_options)


def start_worker(nice, worker_id):
    """DataLoader worker start: Ctrl-C and SIGTERM reach the whole process group, and only the training process
    acts on them (it saves, then ends the workers); then the worker's priority."""
    ignore_stop_signals()
    if nice and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # a sandbox may forbid it: then the workers keep the default
            os.nice(nice)
