"""Write tiny datasets in their real published on-disk formats (for tests).

Every writer returns what it wrote: ``{"train": (images, labels), "test": (images, labels)}``
with uint8 images ``(N, H, W, C)`` in file order and int64 labels, so that tests can compare a
source's output with the truth. Images are random but class-dependent (the mean brightness
grows with the class index), and files are not sorted by class, as in the real ones.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def class_images(
    n_per_class: int | Sequence[int], num_classes: int, hw: int, channels: int, seed: int
) -> Arrays:
    """Random uint8 ``(N, hw, hw, channels)`` images whose mean depends on the class, shuffled."""
    rng = np.random.default_rng(seed)
    per_class = [int(n_per_class)] * num_classes if np.isscalar(n_per_class) else list(n_per_class)
    assert len(per_class) == num_classes, "one count per class"
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    noise = rng.integers(0, 56, size=(len(labels), hw, hw, channels))
    images = (base + noise).clip(0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with ``bytes`` written as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as
    in the published CIFAR pickles: read with ``encoding="latin1"`` (torchvision) they come back
    as ``str``, with ``encoding="bytes"`` as ``bytes``. Python 3's own protocol 2 writes bytes
    as ``_codecs.encode`` calls, which come back as ``bytes`` under every encoding."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(path: Path, obj: dict) -> None:
    """Write ``obj`` as the Python 2 pickles of the CIFAR release are written."""
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, 3072) rows of row-major (C, H, W) bytes, the CIFAR layout."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_cifar10(
    root: str | Path,
    n_per_class: int | Sequence[int] = 20,
    test_per_class: int = 4,
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/cifar-10-batches-py/``: data_batch_1..5, test_batch and batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = class_images(n_per_class, 10, 32, 3, seed)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        python2_pickle(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels[part].tolist(),
                b"data": _cifar_rows(images[part]),
                b"filenames": [f"img_{j:05d}.png".encode() for j in part],
            },
        )
    timages, tlabels = class_images(test_per_class, 10, 32, 3, seed + 1)
    python2_pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": tlabels.tolist(),
            b"data": _cifar_rows(timages),
            b"filenames": [f"test_{j:05d}.png".encode() for j in range(len(tlabels))],
        },
    )
    python2_pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": -(-len(labels) // 5),
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        },
    )
    return {"train": (images, labels), "test": (timages, tlabels)}


def write_cifar100(
    root: str | Path,
    n_per_class: int | Sequence[int] = 5,
    test_per_class: int = 1,
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/cifar-100-python/``: train, test and meta (fine and coarse labels)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, s in (("train", n_per_class, seed), ("test", test_per_class, seed + 1)):
        images, labels = class_images(n, 100, 32, 3, s)
        python2_pickle(
            folder / split,
            {
                b"filenames": [f"{split}_{j:05d}.png".encode() for j in range(len(labels))],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": labels.tolist(),
                b"coarse_labels": (labels // 5).tolist(),
                b"data": _cifar_rows(images),
            },
        )
        out[split] = (images, labels)
    python2_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{c:02d}".encode() for c in range(100)],
            b"coarse_label_names": [f"coarse{c:02d}".encode() for c in range(20)],
        },
    )
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """An idx file of uint8 data: magic 0x0000 08 <ndim>, big-endian int32 sizes, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(
    root: str | Path,
    n_per_class: int | Sequence[int] = 10,
    test_per_class: int = 2,
    seed: int = 0,
    gz: bool = True,
    torchvision_layout: bool = False,
) -> dict[str, Arrays]:
    """idx files (magic 2051 images / 2049 labels) in ``root``, or in ``root/FashionMNIST/raw``
    when ``torchvision_layout``; ``.gz`` unless ``gz=False``."""
    folder = Path(root) / "FashionMNIST" / "raw" if torchvision_layout else Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = {}
    for split, prefix, n, s in (
        ("train", "train", n_per_class, seed),
        ("test", "t10k", test_per_class, seed + 1),
    ):
        images, labels = class_images(n, 10, 28, 1, s)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[..., 0], gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        out[split] = (images, labels)
    return out


# -- image-file datasets (CelebA-HQ, ImageNet-LT, iNaturalist 2018, ArtBench-10) ------------

CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]  # fmt: skip
ARTBENCH_STYLES = [
    "art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism",
    "realism", "renaissance", "romanticism", "surrealism", "ukiyo_e",
]  # fmt: skip


def _save_image(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(array).save(path, format=fmt, quality=95)


def _file_images(labels: np.ndarray, num_classes: int, hw: tuple[int, int], seed: int):
    """Class-dependent random RGB images of ``hw = (height, width)``, one per label."""
    rng = np.random.default_rng(seed)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    noise = rng.integers(0, 56, size=(len(labels), *hw, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


def write_celeba_hq(
    root: str | Path, male: Sequence[int], hw: tuple[int, int] = (40, 40), seed: int = 0
) -> dict[str, Arrays]:
    """``root/CelebA-HQ-img/<i>.jpg`` and ``root/CelebAMask-HQ-attribute-anno.txt`` (count,
    the 40 attribute names, then ``<i>.jpg`` and 40 values of 1 / -1 per row)."""
    root = Path(root)
    labels = np.asarray(male, dtype=np.int64)
    images = _file_images(labels, 2, hw, seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        _save_image(root / "CelebA-HQ-img" / f"{i}.jpg", img)
        values = rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES))
        values[CELEBA_ATTRIBUTES.index("Male")] = 1 if y else -1
        rows.append(f"{i}.jpg " + " ".join(str(v) for v in values))
    text = "\n".join([str(len(labels)), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n"
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(text)
    return {"train": (images, labels)}


def write_imagenet_lt(
    root: str | Path,
    train_counts: Sequence[int],
    test_per_class: int = 2,
    hw: tuple[int, int] = (24, 32),
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/train/<wnid>/<wnid>_<k>.JPEG``, ``root/val/<wnid>/ILSVRC2012_val_<k>.JPEG`` and
    the split lists ``ImageNet_LT_{train,test}.txt`` (``<path> <label>`` per line, shuffled)."""
    root = Path(root)
    num_classes = len(train_counts)
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(num_classes)]
    out = {}
    for split, counts in (("train", list(train_counts)), ("test", [test_per_class] * num_classes)):
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
        labels = labels[np.random.default_rng(seed).permutation(len(labels))]
        images = _file_images(labels, num_classes, hw, seed + len(split))
        lines = []
        for k, (img, y) in enumerate(zip(images, labels)):
            w = wnids[y]
            rel = (
                f"train/{w}/{w}_{k}.JPEG"
                if split == "train"
                else f"val/{w}/ILSVRC2012_val_{k:08d}.JPEG"
            )
            _save_image(root / rel, img)
            lines.append(f"{rel} {y}")
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = (images, labels)
    return out


def write_inaturalist(
    root: str | Path,
    category_ids: Sequence[int],
    train_counts: Sequence[int],
    val_per_class: int = 1,
    hw: tuple[int, int] = (32, 24),
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/train2018.json`` / ``root/val2018.json`` (COCO style: images, annotations,
    categories) over ``root/train_val2018/<kingdom>/<category id>/<hash>.jpg``. Labels in the
    returned arrays are category ranks (the source's class order: sorted ids)."""
    root = Path(root)
    order = np.argsort(category_ids)
    rank = {int(category_ids[i]): r for r, i in enumerate(order)}
    cats = [{"id": int(c), "name": f"Species {c}", "kingdom": "Plantae"} for c in category_ids]
    out = {}
    for split, counts in (("train", list(train_counts)), ("val", [val_per_class] * len(cats))):
        ids = np.repeat(np.asarray(category_ids, dtype=np.int64), counts)
        ids = ids[np.random.default_rng(seed).permutation(len(ids))]
        labels = np.asarray([rank[int(c)] for c in ids], dtype=np.int64)
        images = _file_images(labels, len(cats), hw, seed + len(split))
        data = {"info": {"year": 2018}, "categories": cats, "images": [], "annotations": []}
        for k, (img, c) in enumerate(zip(images, ids)):
            rel = f"train_val2018/Plantae/{c}/{split}{k:05d}.jpg"
            _save_image(root / rel, img)
            image_id = 1000 * (split == "val") + k
            data["images"].append(
                {"id": image_id, "file_name": rel, "width": hw[1], "height": hw[0]}
            )
            data["annotations"].append(
                {"id": image_id, "image_id": image_id, "category_id": int(c)}
            )
        (root / f"{split}2018.json").write_text(json.dumps(data))
        out["train" if split == "train" else "test"] = (images, labels)
    return out


def write_artbench10(
    root: str | Path,
    n_per_class: int | Sequence[int] = 4,
    test_per_class: int = 2,
    hw: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> dict[str, Arrays]:
    """``root/artbench-10-imagefolder-split/{train,test}/<style>/<artist>_<k>.jpg``; the
    returned arrays are in the source's order (style, then file name)."""
    base = Path(root) / "artbench-10-imagefolder-split"
    out = {}
    for split, n in (("train", n_per_class), ("test", test_per_class)):
        counts = [int(n)] * 10 if np.isscalar(n) else list(n)
        labels = np.repeat(np.arange(10, dtype=np.int64), counts)
        images = _file_images(labels, 10, hw, seed + len(split))
        for k, (img, y) in enumerate(zip(images, labels)):
            _save_image(base / split / ARTBENCH_STYLES[y] / f"artist_{k:05d}.jpg", img)
        out[split] = (images, labels)
    return out


# -- a tiny Stable Diffusion (CM Table 6's backbone) ---------------------------------------

SD_MAX_LEN = 16


def write_tiny_sd(
    root: Path, seed: int = 0, schedule: str = "linear", max_length: int = SD_MAX_LEN
) -> Path:
    """A tiny randomly initialised Stable Diffusion in the standard diffusers layout (unet/
    text_encoder/ tokenizer/ vae/ scheduler/), every part saved with its library's
    save_pretrained. ``schedule``: ``"linear"`` (1e-4 .. 0.02) or ``"scaled_linear"`` (Stable
    Diffusion's own, 0.00085 .. 0.012). ``max_length``: the tokenizer's (and text encoder's)
    prompt length in tokens (each letter is a token: two-concept prompts need about 40)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 32],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    ).save_pretrained(root / "vae")
    # A byte-level BPE vocabulary of single letters plus two merges (CLIP's format).
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), "pa", "in"]:
        vocab[token] = len(vocab)
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\np a\ni n\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    scheduler = {
        "_class_name": "DDIMScheduler",
        "beta_schedule": schedule,
        "beta_start": 1e-4 if schedule == "linear" else 0.00085,
        "beta_end": 0.02 if schedule == "linear" else 0.012,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


def write_concept_images(
    root: str | Path,
    counts: dict[str, int],
    hw: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``root/<concept>/<concept>_<k>.png`` for the IMBA experiments' concept images
    (``dataset=concept_images``); the returned arrays per concept are in file-name order."""
    out = {}
    for c, (concept, n) in enumerate(counts.items()):
        images = _file_images(np.full(int(n), c), len(counts), hw, seed + c)
        for k, img in enumerate(images):
            _save_image(Path(root) / concept / f"{concept}_{k:05d}.png", img)
        out[concept] = images
    return out


def _tiny_clip_tokenizer(folder: Path, max_length: int) -> None:
    """The tiny Stable Diffusion's letter-level CLIP BPE vocabulary in ``folder``."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), "pa", "in"]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\np a\ni n\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))


def write_tiny_clip(root: Path, seed: int = 0, max_length: int = 77) -> Path:
    """A tiny randomly initialised transformers ``CLIPModel`` with its ``CLIPProcessor`` (the
    letter-level tokenizer, 32 px images), saved with save_pretrained: what a staged CLIP
    folder holds (``$LT_DIFFUSION_CLIP``)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = Path(root)
    _tiny_clip_tokenizer(root / "_tokenizer", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "_tokenizer"))
    size = {"shortest_edge": 32}
    images = CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
            "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": max_length, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
              "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(root)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    return root


def write_tiny_vqa(root: Path, answer: str | None = None, seed: int = 0) -> Path:
    """A tiny randomly initialised transformers ``BlipForQuestionAnswering`` with its
    ``BlipProcessor`` (a small BERT vocabulary, 32 px images), saved with save_pretrained: what
    a staged VQA folder holds (``$LT_DIFFUSION_VQA``). ``answer`` ("yes" / "no"): the answer
    decoder's output bias makes it the first word of every answer."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "is", "there",
             "a", "in", "the", "image", "?", "of", "photo"]  # fmt: skip
    (root / "_vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(root / "_vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32,
            "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
              "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision))
    if answer is not None:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[tokenizer.convert_tokens_to_ids(answer)] += 1e3
    model.save_pretrained(root)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root)  # fmt: skip
    return root


# -- fine-grained text-to-image datasets (CM Table G.11) ------------------------------------

CAPTIONS_PER_IMAGE = 10


def image_captions(dataset: str, label: int, image: int, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """The fake captions of one image: ``n`` lines naming the dataset, class and image, so a
    test can tell which image a caption was read for."""
    return [f"{dataset} class {label} image {image} caption {j}" for j in range(n)]


def _write_captions(path: Path, captions: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(captions) + "\n")


def write_cub200(
    root: str | Path,
    n_per_class: int | Sequence[int] = 4,
    test_per_class: int = 2,
    num_classes: int = 3,
    hw: tuple[int, int] = (24, 32),
    seed: int = 0,
) -> dict[str, Any]:
    """``root/CUB_200_2011/`` (images/<NNN.Name>/<Name>_<k>.jpg, images.txt,
    image_class_labels.txt, train_test_split.txt, classes.txt) and Reed et al.'s captions
    ``root/cvpr2016_cub/text_c10/<NNN.Name>/<Name>_<k>.txt``. Image ids are shuffled against
    the classes and the splits interleave, as in the release. Returns per split the images,
    labels and captions in the source's order (image id)."""
    base = Path(root) / "CUB_200_2011"
    counts = [int(n_per_class)] * num_classes if np.isscalar(n_per_class) else list(n_per_class)
    labels = np.concatenate(
        [
            np.repeat(np.arange(num_classes), counts),
            np.repeat(np.arange(num_classes), test_per_class),
        ]
    ).astype(np.int64)
    train = np.asarray([1] * sum(counts) + [0] * (num_classes * test_per_class))
    order = np.random.default_rng(seed).permutation(len(labels))
    labels, train = labels[order], train[order]
    images = _file_images(labels, num_classes, hw, seed)
    folders = [f"{c + 1:03d}.Bird_{c}" for c in range(num_classes)]
    rows: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split")}
    captions = []
    for k, (img, y, tr) in enumerate(zip(images, labels, train)):
        rel = f"{folders[y]}/Bird_{y}_{k:04d}.jpg"
        _save_image(base / "images" / rel, img)
        rows["images"].append(f"{k + 1} {rel}")
        rows["labels"].append(f"{k + 1} {y + 1}")
        rows["split"].append(f"{k + 1} {tr}")
        captions.append(image_captions("cub", int(y), k + 1))
        _write_captions(Path(root) / "cvpr2016_cub/text_c10" / Path(rel).with_suffix(".txt"),
                        captions[-1])  # fmt: skip
    (base / "images.txt").write_text("\n".join(rows["images"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(rows["labels"]) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(rows["split"]) + "\n")
    (base / "classes.txt").write_text(
        "\n".join(f"{c + 1} {f}" for c, f in enumerate(folders)) + "\n"
    )
    out: dict[str, Any] = {}
    for split, flag in (("train", 1), ("test", 0)):
        keep = train == flag
        out[split] = (images[keep], labels[keep], [c for c, m in zip(captions, keep) if m])
    return out


def write_oxford102(
    root: str | Path,
    train_per_class: int = 4,
    test_counts: int | Sequence[int] = 2,
    num_classes: int = 3,
    hw: tuple[int, int] = (32, 24),
    seed: int = 0,
) -> dict[str, Any]:
    """``root/jpg/image_<id:05d>.jpg``, ``root/imagelabels.mat`` (``labels``, 1-based, a 1 x N
    row as in the release) and ``root/setid.mat`` (``trnid``, ``valid``, ``tstid``), written by
    scipy in MATLAB v5 format; captions
    ``root/cvpr2016_flowers/text_c10/class_<c:05d>/image_<id:05d>.txt``. ``train_per_class``
    images of each class are split between trnid and valid. Returns per split the images,
    labels and captions in the source's order (image id)."""
    from scipy.io import savemat

    root = Path(root)
    tests = [int(test_counts)] * num_classes if np.isscalar(test_counts) else list(test_counts)
    labels = np.concatenate(
        [
            np.repeat(np.arange(num_classes), train_per_class),
            np.repeat(np.arange(num_classes), tests),
        ]
    ).astype(np.int64)
    part = np.asarray(["trn", "val"] * (num_classes * train_per_class // 2 + 1))
    part = np.concatenate([part[: num_classes * train_per_class], ["tst"] * sum(tests)])
    order = np.random.default_rng(seed).permutation(len(labels))
    labels, part = labels[order], part[order]
    images = _file_images(labels, num_classes, hw, seed)
    captions = []
    for k, (img, y) in enumerate(zip(images, labels)):
        _save_image(root / "jpg" / f"image_{k + 1:05d}.jpg", img)
        captions.append(image_captions("flowers", int(y), k + 1))
        folder = root / "cvpr2016_flowers/text_c10" / f"class_{y + 1:05d}"
        _write_captions(folder / f"image_{k + 1:05d}.txt", captions[-1])
    ids = np.arange(1, len(labels) + 1)
    savemat(root / "imagelabels.mat", {"labels": (labels + 1)[None, :].astype(np.float64)})
    savemat(root / "setid.mat", {f"{p}id" if p != "val" else "valid": ids[part == p][None, :]
                                 for p in ("trn", "val", "tst")})  # fmt: skip
    out: dict[str, Any] = {}
    for split, keep in (("train", part != "tst"), ("test", part == "tst")):
        out[split] = (images[keep], labels[keep], [c for c, m in zip(captions, keep) if m])
    return out
