"""How image files become pixels: JPEGs by TorchCodec's decoder (torchvision's where torchcodec does not import),
other formats by PIL whatever their name, on the CPU or in batches on the training device (--decode-on device).
Training and validation get the stored pixels (the EXIF orientation tag ignored, as torchvision's ImageFolder
does); large RandomResizedCrop boxes are decoded at a DCT scale. Why each piece: docs/data-pipeline.md.
"""
import contextlib
import functools
import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from utils import DataError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision has announced it will move its decoders to TorchCodec
    decode_jpeg = None
try:  # TorchCodec's JPEG decoder (libjpeg-turbo, bundled): the maintained successor of torchvision's
    from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
except Exception:  # missing, or built for another torch version (each torchcodec release matches one torch)
    torchcodec_decode_jpeg = None

# What a broken image file raises: PIL (OSError, SyntaxError, EOFError, DecompressionBombError), the JPEG
# decoders (RuntimeError), odd headers (ValueError).
DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Not the file's fault when decoding on a GPU, so never reported as a bad image (AcceleratorError: torch >= 2.8)
DEVICE_FAILURES = tuple(getattr(torch, name) for name in ("OutOfMemoryError", "AcceleratorError")
                        if hasattr(torch, name))


@contextlib.contextmanager
def torchvision_decoding():
    """Silences torchvision 0.29's notice that its decoders are deprecated, around our calls of them only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def decode_jpeg_cpu(data, exif_orientation=False):
    """JPEG bytes (a 1-D uint8 tensor) -> uint8 RGB (3, H, W), laid out height-width-channel in memory (the
    fastest layout for v2's uint8 resize): the stored pixels, or with exif_orientation turned upright by the EXIF
    tag. TorchCodec's decoder where it imports, else torchvision's (the same libjpeg-turbo and pixels)."""
    if torchcodec_decode_jpeg is None:
        with torchvision_decoding():
            image = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=exif_orientation)
    else:
        image = torchcodec_decode_jpeg(data if exif_orientation else with_stored_orientation(data), mode="RGB")
    if not image.permute(1, 2, 0).is_contiguous():  # turned: height-width-channel in memory again
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return image


def read_image_file(path, jpeg_modes=("RGB", "L", "CMYK"), exif_orientation=False):
    """(data, size): a JPEG in one of jpeg_modes as its bytes (a 1-D uint8 tensor) and its stored (height,
    width); any other image decoded by PIL (turned by its EXIF tag with exif_orientation) as uint8 RGB (3, H, W),
    and None. Image.open reads only the header: the real format, and PIL's decompression-bomb check for all."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # its message names our BytesIO object, not the file
        raise Image.UnidentifiedImageError("not an image format Pillow can read") from None
    with image:
        has_decoder = torchcodec_decode_jpeg is not None or decode_jpeg is not None
        if has_decoder and image.format == "JPEG" and image.mode in jpeg_modes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), (image.height, image.width)
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        pixels = np.array(eight_bit(image).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1), None


def eight_bit(image):
    """A PIL image whose convert("RGB") gives its true picture: 16-bit greys scaled to 8 bits (convert would clip
    them to white; PNG and PGM files hold at most 16 bits, whatever mode PIL opens them in); 32-bit integer and
    float pixels, whose range no file states, refused."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):
        return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels have no fixed "
                         "range: save the image with 8 (or 16) bits per channel")
    return image


def decode_image_file(path, exif_orientation=False):
    """The image at path as uint8 RGB (3, H, W): JPEGs by decode_jpeg_cpu, other files by PIL. The stored pixels,
    as torchvision's ImageFolder gives them, or with exif_orientation turned as a viewer shows them (--predict)."""
    data, size = read_image_file(path, exif_orientation=exif_orientation)
    if size is None:
        return data
    return decode_jpeg_cpu(data, exif_orientation)


def bad_file_reason(error):
    """What a decoding error says about the file, in one line."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", reason)  # the decoder's C++ source location says nothing here


# --decode-on device: a batch of JPEGs (1-D uint8 CPU tensors) decoded in one call on the device (nvjpeg on
# CUDA) to their stored pixels, uint8 RGB (3, H, W) each; RuntimeError when one of them can't be.

def decode_with_torchcodec(device, jpegs):
    """TorchCodec decodes on the current CUDA stream and returns when it is done."""
    return torchcodec_decode_jpeg([with_stored_orientation(data) for data in jpegs], mode="RGB", device=device)


def decode_with_torchvision(device, jpegs):
    """torchvision's nvjpeg writes from a stream of its own without waiting for ours (pytorch/vision#9606): the
    current stream is synchronized first, so it cannot overwrite memory that queued kernels are about to read."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with torchvision_decoding():
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


DEVICE_DECODERS = {"TorchCodec": decode_with_torchcodec, "torchvision": decode_with_torchvision}


def decode_jpegs_on(device, jpegs):
    """The batch decoded by the decoder that works on device (device_jpeg_decoder)."""
    return DEVICE_DECODERS[device_jpeg_decoder(device)](device, jpegs)


def device_jpeg_decoder(device):
    """'TorchCodec' or 'torchvision': TorchCodec where it imports and decodes on device, else torchvision."""
    if device.type == "cpu":
        return "TorchCodec" if torchcodec_decode_jpeg is not None else "torchvision"
    return first_decoder_that_works_on(device)


@functools.lru_cache(maxsize=None)
def first_decoder_that_works_on(device):
    """Tried once per device on a small JPEG: a CPU-only torchcodec wheel imports but has no nvjpeg, and
    torchvision decodes on the CPU for a device it has no decoder for. DataError naming each reason if none works."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    probe = [torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)]
    reasons = []
    for name, available in (("TorchCodec", torchcodec_decode_jpeg), ("torchvision", decode_jpeg)):
        if available is None:
            reasons.append(f"{name}: not installed")
            continue
        try:
            if DEVICE_DECODERS[name](device, probe)[0].device.type == device.type:
                return name
            reasons.append(f"{name}: decodes on the CPU instead")
        except (RuntimeError, NotImplementedError, ValueError) as error:
            if is_device_failure(error):  # the device's fault, not the decoder's: never cached as a choice
                raise
            reasons.append(f"{name}: {bad_file_reason(error).split('. ')[0]}")
    raise DataError(f"--decode-on device: no JPEG decoder here works on {device} ({'; '.join(reasons)}); "
                    "use --decode-on workers")


def is_device_failure(error):
    """Out of GPU memory, a broken CUDA context: not the file's fault. The decoders raise these as plain
    RuntimeError too (TorchCodec passes every C++ error through torch's stable ABI as one)."""
    return isinstance(error, DEVICE_FAILURES) or any(text in str(error) for text in (
        "out of memory", "CUDA error", "Failed to synchronize CUDA stream"))


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation for TorchCodec: its decode_jpeg always turns a JPEG by the EXIF orientation tag (0.17 has no
# option not to), so the tags are set to 1 in a copy of the bytes. Remove this section, and its two calls above,
# once TorchCodec can leave the orientation alone. Why not Pillow's reading of the tag: docs/data-pipeline.md.


def with_stored_orientation(data):
    """JPEG bytes (a 1-D uint8 tensor) that TorchCodec decodes to the stored pixels: data, or a copy whose EXIF
    orientation tags all say 1 (its CPU and CUDA decoders read the tag from different segments)."""
    places = [place for place in exif_orientation_places(data) if place[2] != 1]
    if not places:
        return data
    data = data.clone()
    for offset, order, _ in places:
        data[offset:offset + 2] = torch.tensor(list((1).to_bytes(2, order)), dtype=torch.uint8)
    return data


def exif_orientation_places(data):
    """[(offset, byte order, value)] of the orientation tag in the first directory of every APP1 segment before
    the image data, from the segment headers alone. Walks the markers as libjpeg does (stray bytes skipped,
    markers without a length) and reads the directory as TorchCodec does (big-endian unless "II")."""
    header = memoryview(data.numpy())  # indexing gives plain ints: fast
    places, position = [], 2  # after the start-of-image marker
    while position + 4 <= len(header):
        if header[position] != 0xFF or header[position + 1] == 0xFF:  # stray byte, or fill byte before a marker
            position += 1
            continue
        marker = header[position + 1]
        if marker in (0xDA, 0xD9):  # start of scan (the image data), end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length field
            position += 2
            continue
        length = header[position + 2] << 8 | header[position + 3]
        if marker == 0xE1:
            start = position + 10  # the TIFF header, after "Exif\0\0"
            tiff = header[start:position + 2 + length].tobytes()
            order = "little" if tiff[:2] == b"II" else "big"
            if len(tiff) >= 8 and int.from_bytes(tiff[2:4], order) == 0x2A:  # else XMP, say
                directory = int.from_bytes(tiff[4:8], order)
                count = int.from_bytes(tiff[directory:directory + 2], order)
                for entry in range(directory + 2, min(directory + 2 + 12 * count, len(tiff) - 9), 12):
                    if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:  # orientation, a 2-byte value
                        places.append((start + entry + 8, order, int.from_bytes(tiff[entry + 8:entry + 10], order)))
        position += 2 + max(length, 2)
    return places


# ----------------------------------------------------------------------------------------------------------
# Scaled decoding: a RandomResizedCrop box at least twice the output decoded at 1/2, 1/4 or 1/8 size


def draw_crop_box(crop, image_size):
    """RandomResizedCrop's box (top, left, height, width) for an image of image_size (height, width), drawn with
    the same random calls as crop(image) makes: it depends on the image's size only."""
    box = crop.make_params([torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, *image_size)])
    return box["top"], box["left"], box["height"], box["width"]


def dct_scale(box_height, box_width, out_height, out_width):
    """The denominator of the smallest JPEG DCT scale (1/8, 1/4, 1/2 or 1) at which the box still holds at least
    out_height x out_width pixels, so that the crop is still shrunk, never enlarged."""
    for scale in (8, 4, 2):
        if box_height >= scale * out_height and box_width >= scale * out_width:
            return scale
    return 1


def decode_jpeg_crop_reduced(data, scale, box, out_size):
    """The box (top, left, height, width, in full-size pixels) of JPEG bytes decoded at 1/scale size by DCT
    scaling (PIL's draft) and resized to out_size (height, width): uint8 RGB (3, *out_size); None if the decoder
    did not reduce by exactly scale. The box's edges divided by scale go to PIL's resize as fractions, so the
    geometry is exactly the full-size crop's (rounded edges would shift it by up to half an output pixel)."""
    top, left, height, width = box
    with Image.open(io.BytesIO(data.numpy())) as image:
        full_width, full_height = image.size
        image.draft("RGB", (full_width // scale, full_height // scale))
        if image.size != (-(-full_width // scale), -(-full_height // scale)):
            return None
        if image.mode != "RGB":
            image = image.convert("RGB")
        edges = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        image = image.resize(out_size[::-1], Image.Resampling.BILINEAR, box=edges)  # antialiased, like v2's
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # height-width-channel in memory, like decode_jpeg's
