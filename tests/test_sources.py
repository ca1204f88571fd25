"""Inputs that live on disk: workers read their own slices; the client reads metadata."""

import numpy as np
import pytest

from nbtool.errors import InputMismatch, NbtoolError
from nbtool.wire import ImageFiles, NpyFile, ZarrRef
from nbtool.prediction.inputs import as_source, images
from nbtool.prediction.sources import ImageFolderSource, ZarrSource


@pytest.fixture
def zarr_input(tmp_path, reference):
    import zarr

    z = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=reference["x8"].shape,
                          chunks=(16, 8), dtype="float32")
    z[:] = reference["x8"]
    return tmp_path / "x.zarr"


@pytest.fixture
def image_folder(tmp_path, reference):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    for i, p in enumerate(pixels):
        # Different sizes on disk: the workers resize every image to 8x8.
        Image.fromarray(p).resize((16, 16) if i % 2 else (8, 8), Image.NEAREST).save(
            folder / f"img{i:02d}.png")
    return folder, pixels


def test_zarr_path_and_object_are_read_by_the_workers(engine, model_dir, reference, unique,
                                                      zarr_input):
    import zarr

    src = as_source(str(zarr_input))
    assert isinstance(src, ZarrSource) and isinstance(src.ref, ZarrRef)
    args = src.chunk_args(None, [], 10)
    assert all(isinstance(a[0], ZarrRef) for a in args)      # references, never rows
    name = f"{unique}_z"
    engine.register(name, model_dir / "mlp.keras")
    for x in (str(zarr_input), zarr.open_array(str(zarr_input), mode="r")):
        res = engine.predict(name, x, chunk_size=16)
        assert np.abs(res[name] - reference["mlp"]).max() <= 1e-5


def test_an_image_folder_is_decoded_and_resized_on_the_workers(engine, keras, image_folder,
                                                               unique):
    folder, pixels = image_folder
    src = as_source(str(folder))
    assert isinstance(src, ImageFolderSource) and src.row_shape == (8, 8, 3)
    # Each task carries only its own file names.
    args = src.chunk_args(None, [], 5)
    assert [len(a[0].files) for a in args] == [5, 5, 2]
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    name = f"{unique}_img"
    engine.register(name, model)
    res = engine.predict(name, images(folder, size=(8, 8), color="L", scale=1 / 255),
                         chunk_size=5)
    from PIL import Image

    # What the workers should have read: each file decoded and resized to 8x8 by PIL.
    decoded = np.stack([np.asarray(Image.open(f).convert("L").resize((8, 8), Image.BILINEAR),
                                   dtype="float32") for f in sorted(folder.glob("*.png"))])
    assert np.array_equal(decoded[0::2], pixels[0::2].astype("float32"))  # 8x8 files as-is
    expected = model.predict(decoded[..., None] / 255, verbose=0)
    assert np.abs(res[name] - expected).max() <= 1e-4


def test_bad_sources_say_what_is_wrong(tmp_path, image_folder):
    folder, _ = image_folder
    (folder / "broken.png").write_bytes(b"not a png")
    ref = images(folder, size=(8, 8)).ref
    from nbtool.worker.reading import read_rows

    with pytest.raises(NbtoolError, match=r"broken.png: cannot decode it"):
        read_rows(ref, 0, len(ref.files))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputMismatch, match="image files"):
        as_source(str(empty))
    (tmp_path / "bad.zarr").mkdir()
    with pytest.raises(NbtoolError, match="cannot open it as a zarr array"):
        as_source(str(tmp_path / "bad.zarr"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), "float32"))
    with pytest.raises(InputMismatch, match="at least one row"):
        as_source(str(tmp_path / "empty.npy"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(NbtoolError, match="cannot read it as a .npy"):
        as_source(str(tmp_path / "junk.npy"))


def test_npy_rows_are_read_by_reference():
    src_ref = NpyFile("x.npy")
    assert ImageFiles(("a.png",), (2, 2)).color == "RGB" and src_ref.path == "x.npy"


def test_shared_memory_folder_is_private_and_never_one_another_user_planted():
    # In a child process: its /dev/shm/nbtool-<pid> is new (this process's engine may
    # already have made its own).
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, shutil, tempfile
        from pathlib import Path
        from nbtool.prediction.sources import shared_folder
        fallback = Path(tempfile.mkdtemp())
        mine = Path(f"/dev/shm/nbtool-{os.getpid()}")
        try:
            got = shared_folder(fallback, 10)
            print("own", got == mine and (os.stat(mine).st_mode & 0o777) == 0o700)
            shutil.rmtree(mine)
            target = fallback / "theirs"
            target.mkdir()
            mine.symlink_to(target)                      # planted first: a symlink
            print("symlink", shared_folder(fallback, 10) == fallback)
            mine.unlink()
            mine.mkdir()
            os.chmod(mine, 0o777)                        # open to others
            print("open", shared_folder(fallback, 10) == fallback)
            os.chmod(mine, 0o700)
            os.chown(mine, 65534, 65534)                 # another user's
            print("foreign", shared_folder(fallback, 10) == fallback)
        finally:
            if mine.is_symlink():
                mine.unlink()
            elif mine.exists():
                shutil.rmtree(mine)
            shutil.rmtree(fallback)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["own", "True", "symlink", "True", "open", "True",
                                  "foreign", "True"], out.stdout
