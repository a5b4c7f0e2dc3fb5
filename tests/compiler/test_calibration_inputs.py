"""Calibration and training inputs: image folders, text corpora, and the warning for image models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.calibration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_calibration,
    load_data,
    random_calibration_warning,
)
from potstill.inputs.data import iter_batches, resize_center_crop
from potstill.inputs.teacher import load_teacher

CNN = """
import torch
from torch import nn

def factory():
    return nn.Sequential(nn.Conv2d({c}, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

def example_inputs():
    return (torch.zeros(1, {c}, 12, 16),)
"""


def _teacher_file(tmp_path: Path, channels: int = 3, extra: str = "") -> Path:
    path = tmp_path / f"cnn{channels}.py"
    path.write_text(textwrap.dedent(CNN.format(c=channels)) + textwrap.dedent(extra))
    return path


def _photos(folder: Path, n: int = 5) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_resize_center_crop_keeps_the_aspect_and_the_centre():
    from PIL import Image

    arr = np.zeros((10, 40, 3), dtype=np.uint8)
    arr[:, 18:22] = 255  # a white band in the middle
    x = resize_center_crop(Image.fromarray(arr), 10, 10)
    assert x.shape == (3, 10, 10)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[:, :, 3:7].mean()) > 0.9 and float(x[:, :, 0].mean()) < 0.1


def test_image_folder_for_a_file_teacher_without_preprocess(tmp_path: Path):
    t = load_teacher(f"{_teacher_file(tmp_path)}:factory")
    notes: list[str] = []
    calib = load_calibration(str(_photos(tmp_path / "photos")), t, batch_size=2, num_batches=2, note=notes.append)
    assert calib is not None
    batches = list(iter_batches(calib))
    assert [b.args[0].shape for b in batches] == [(2, 3, 12, 16), (2, 3, 12, 16)]
    assert all(float(b.args[0].min()) >= 0.0 and float(b.args[0].max()) <= 1.0 for b in batches)
    assert any("no preprocess" in n for n in notes)
    assert any("4 images" in n and "1 more not used" in n for n in notes)
    again = list(iter_batches(calib))
    assert all(torch.equal(a.args[0], b.args[0]) for a, b in zip(batches, again))


def test_image_folder_uses_the_teacher_files_preprocess_and_grayscale(tmp_path: Path):
    extra = """
    def preprocess(image):
        x = torch.tensor(list(image.resize((16, 12)).getdata()), dtype=torch.float32).view(12, 16)
        return (x / 255.0 - 0.5)[None]
    """
    t = load_teacher(f"{_teacher_file(tmp_path, 1, extra)}:factory")
    assert "preprocess" in t.hooks
    calib = load_data(str(_photos(tmp_path / "photos", 3)), t, "--calib", batch_size=8)
    (batch,) = list(iter_batches(calib))
    x = batch.args[0]
    assert x.shape == (3, 1, 12, 16) and float(x.min()) < 0.0  # the hook's normalisation

    bad = """
    def preprocess(image):
        return torch.zeros(1, 5, 5)
    """
    (tmp_path / "b").mkdir()
    t = load_teacher(f"{_teacher_file(tmp_path / 'b', 1, bad)}:factory")
    with pytest.raises(InputError, match=r"preprocess\(\) returned images of shape"):
        load_data(str(tmp_path / "photos"), t, "--calib")


def test_image_folder_errors(tmp_path: Path):
    t = load_teacher(f"{_teacher_file(tmp_path)}:factory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no images"):
        load_calibration(str(tmp_path / "empty"), t)
    photos = _photos(tmp_path / "photos", 2)
    (photos / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"broken\.png.*cannot read"):
        load_calibration(str(photos), t)
    bert = _bert(tmp_path)
    with pytest.raises(InputError, match="image models only"):
        load_calibration(str(_photos(tmp_path / "p2", 1)), bert)


def test_hf_vision_folder_without_processor_uses_imagenet_statistics(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5)  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    t = load_teacher(f"hf:{tmp_path / 'vit'}")
    notes: list[str] = []
    calib = load_calibration(str(_photos(tmp_path / "photos", 3)), t, batch_size=4, note=notes.append)
    assert calib is not None
    (batch,) = list(calib())
    x = batch["pixel_values"]
    assert x.shape == (3, 3, 16, 16)
    assert any("ImageNet mean and std" in n for n in notes)
    assert float(x.min()) >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-6
    assert t.module(**batch).logits.shape == (3, 5)
    # with a saved image processor its transform is used (ViT: mean = std = 0.5)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    t = load_teacher(f"hf:{tmp_path / 'vit'}")
    notes.clear()
    (batch,) = list(load_data(str(tmp_path / "photos"), t, "--calib", note=notes.append)())
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert float(batch["pixel_values"].min()) >= -1.0 - 1e-6
    assert not any("ImageNet" in n for n in notes)


def _bert(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    path = tmp_path / "tiny-bert"
    transformers.BertModel(cfg).save_pretrained(path)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    return load_teacher(f"hf:{path}")


def test_data_accepts_a_text_corpus_and_reads_all_of_it(tmp_path: Path):
    t = _bert(tmp_path)
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(f"the quick fox {i}" for i in range(21)))
    data = load_data(str(corpus), t, "--data", batch_size=8)
    sizes = [b["input_ids"].shape[0] for b in data()]
    assert sizes == [8, 8, 5]
    with pytest.raises(InputError, match="--data"):
        load_data(str(tmp_path / "missing.txt"), t, "--data")


def test_random_calibration_warning_is_for_image_models_only(tmp_path: Path):
    cnn = load_teacher(f"{_teacher_file(tmp_path)}:factory")
    msg = random_calibration_warning(cnn)
    assert msg is not None and "random pixels" in msg and "--calib" in msg
    assert random_calibration_warning(_bert(tmp_path)) is None


def test_corpus_is_streamed_capped_and_binary_refused(tmp_path, monkeypatch) -> None:
    import potstill.inputs.corpus as corpus_mod
    from potstill.errors import InputError
    from potstill.inputs.corpus import read_texts

    notes: list[str] = []
    one_line = tmp_path / "one-line.txt"
    one_line.write_bytes(b"word " * 200_000)  # 1 MB on one line: cut at the line cap, not read whole
    (text,) = read_texts(str(one_line), note=notes.append)
    assert len(text.encode()) <= corpus_mod.MAX_LINE_BYTES
    assert any("longer than 16 KB" in n for n in notes)
    monkeypatch.setattr(corpus_mod, "MAX_CORPUS_LINES", 3)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"sentence {i}\n" for i in range(10)))
    notes.clear()
    assert read_texts(str(many), note=notes.append) == ["sentence 0", "sentence 1", "sentence 2"]
    assert notes == [f"--calib '{many}': read the first 3 lines of the file (the corpus cap)"]
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02 not text\n")
    with pytest.raises(InputError, match=r"weights.txt': a binary file"):
        read_texts(str(binary), "--data")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt': not UTF-8 text"):
        read_texts(str(latin))


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` RGB pixels and whose data is empty: opening it reads
    the size; decoding it fails (the file is a few dozen bytes)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def test_image_folders_count_in_the_memory_estimate_as_read(tmp_path: Path) -> None:
    """The data part is what the real loader holds: every image decoded, and the float32 pixels it
    makes of them twice over (per-image tensors, then the stacked batch); --calib reads its batches'
    worth of images, --data the whole folder."""
    from potstill.inputs.data import image_files, load_image
    from potstill.inputs.memory import image_folder_bytes, preflight_memory

    t = load_teacher(f"{_teacher_file(tmp_path)}:factory")
    photos = _photos(tmp_path / "photos", 5)  # 20..24 x 30 pixels, and a notes.txt that is not an image

    def held(source: object, n: int) -> int:
        decoded = sum(len(load_image(p, 3).tobytes()) for p in image_files(photos)[:n])
        pixels = torch.cat([b.args[0] for b in iter_batches(source)])
        assert pixels.shape == (n, 3, 12, 16)
        return decoded + 2 * pixels.numel() * pixels.element_size()

    whole = held(load_data(str(photos), t, "--data", batch_size=2), 5)
    calib = held(load_calibration(str(photos), t, batch_size=2, num_batches=1), 2)
    assert image_folder_bytes(photos, (3, 12, 16)) == whole
    assert image_folder_bytes(photos, (3, 12, 16), limit=2, flag="--calib") == calib
    lines: list[str] = []
    folders = [("--calib", str(photos), 2), ("--data", str(photos), None), ("--data", None, None)]
    est = preflight_memory(t.module, data=(str(photos), str(photos)), images=folders, image_chw=(3, 12, 16),
                           note=lines.append)
    assert est is not None and est.parts["data"] == whole + calib and lines == [est.text()]
    # a teacher that takes no images reads none (the loader refuses the folder)
    est = preflight_memory(t.module, images=folders, image_chw=None, note=lines.append)
    assert est is not None and "data" not in est.parts
    # an hf:DIR teacher, before it is loaded: its config.json gives the input size
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text('{"num_channels": 3, "image_size": 32}')
    est = preflight_memory(f"hf:{hf}", images=[("--data", str(photos), None)], note=lines.append)
    assert est is not None and est.parts["data"] == image_folder_bytes(photos, (3, 32, 32))


def test_a_data_folder_too_large_to_read_is_refused_before_it_is_read(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Four 9000x9000 photos decode to 0.97 GB: with --max-memory 1.5G the compile (0.8 GB without them)
    is refused by the estimate, naming its data part, instead of running out of memory reading them."""
    from potstill.cli import main

    big = tmp_path / "big"
    big.mkdir()
    for i in range(4):
        _png_header(big / f"p{i}.png", 9000, 9000)
    teacher = f"{_teacher_file(tmp_path)}:factory"
    code = main(["compile", teacher, "--data", str(big), "--max-memory", "1.5G", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert code == 2, err
    assert "exceeds --max-memory (1.5 GB)" in flat and "data 1.0" in flat, err
    assert "Its data part (1.0 GB: --calib / --data as read) shrinks with fewer or smaller images" in flat
    assert not (tmp_path / "out").exists()


def test_an_image_past_the_decompression_bomb_limit_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PIL refuses to open a 30000x30000 image (900M pixels) with DecompressionBombError, which is no
    OSError: the loader and the memory estimate both name the file and the fix, and the CLI exits 2."""
    from potstill.cli import main
    from potstill.inputs.memory import image_folder_bytes

    big = tmp_path / "big"
    big.mkdir()
    _png_header(big / "p0.png", 30000, 30000)
    t = load_teacher(f"{_teacher_file(tmp_path)}:factory")
    with pytest.raises(InputError, match=r"p0\.png': the image has more pixels than PIL opens .*downscale it"):
        load_calibration(str(big), t)
    with pytest.raises(InputError, match=r"--data '.*p0\.png': the image has more pixels than PIL opens"):
        image_folder_bytes(big, (3, 12, 16))
    code = main(["compile", f"{_teacher_file(tmp_path)}:factory", "--calib", str(big), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "p0.png': the image has more pixels than PIL opens" in err, err
