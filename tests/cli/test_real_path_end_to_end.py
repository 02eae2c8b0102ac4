"""The released-model path on CPU: the 2b_lora example's spec shape with tiny random VAE/T5/DiT.

data embed -> data encode -> run (LoRA, cached latents) -> consolidate --merge-lora -> infer --prompt -> mp4.
Only sizes and asset paths are overridden; tokenizer kind, LoRA, EMA and the text encoder section are the example's.
"""

from __future__ import annotations

import av
import tomli_w
from typer.testing import CliRunner

from cosmos_train.cli import app
from cosmos_train.data.latents import CACHE_NAME, LatentStore
from cosmos_train.data.video import write_mp4
from cosmos_train.spec_loading import apply_overrides, load_raw, validate_spec
from tests.data.media import ramp_frames
from tests.tiny_assets import save_tiny_t5, save_vae_both_layouts, tiny_vae
from tests.train_fixtures import ROOT

runner = CliRunner()


def _dataset(root, n=2, frames=9, size=32):
    (root / "metas").mkdir(parents=True)
    (root / "videos").mkdir()
    for i in range(n):
        write_mp4(root / "videos" / f"clip_{i}.mp4", ramp_frames(frames, size, size, seed=i))
        (root / "metas" / f"clip_{i}.txt").write_text(f"A video of sks teal robot. the red cube moves {'left' if i else 'right'}.")
    return root


def test_embed_encode_run_consolidate_infer_prompt(tmp_path):
    data = _dataset(tmp_path / "dataset")
    _, vae_pth = save_vae_both_layouts(tiny_vae(), tmp_path / "vae")  # upstream tokenizer/tokenizer.pth
    t5 = save_tiny_t5(tmp_path / "hub", split=True)  # the Hub's text_encoder/ + tokenizer/
    raw = apply_overrides(load_raw(ROOT / "examples" / "2b_lora.toml"), [
        f"job.output_root='{tmp_path / 'runs'}'", "job.wandb_mode='disabled'",
        "model.architecture.model_channels=32", "model.architecture.num_blocks=2", "model.architecture.num_heads=2",
        "model.architecture.adaln_lora_dim=16", "model.lora.rank=4", "model.lora.alpha=4",
        f"model.tokenizer.path='{vae_pth}'", f"model.text_encoder.path='{t5}'",
        f"data.dataset_dir='{data}'", "data.num_frames=9", "data.video_size=[32, 32]", "data.batch_size=1",
        "data.num_workers=0", "data.latents='cached'", "parallel.cp=1",
        "trainer.max_iter=2", "trainer.logging_iter=1", "checkpoint.save_iter=2"])
    del raw["checkpoint"]["load_path"]  # the released 2B weights are not here; the DiT starts from random
    spec = validate_spec(raw)
    assert (spec.model.tokenizer.kind, spec.model.train_architecture) == ("wan2.1", "lora")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(tomli_w.dumps(raw))

    r = runner.invoke(app, ["data", "embed", str(data), "--spec", str(spec_file), "--device", "cpu"])
    assert r.exit_code == 0 and "2 embedded" in r.output, r.output
    r = runner.invoke(app, ["data", "encode", str(data), "--spec", str(spec_file), "--device", "cpu"])
    assert r.exit_code == 0 and "2 encoded" in r.output, r.output
    assert LatentStore(data / CACHE_NAME).attrs["latent_shape"] == [16, 3, 4, 4]

    r = runner.invoke(app, ["run", str(spec_file)])
    assert r.exit_code == 0, r.output
    model_pt = tmp_path / "model.pt"
    r = runner.invoke(app, ["consolidate", str(spec.run_dir()), "-o", str(model_pt), "--merge-lora", "--no-progress"])
    assert r.exit_code == 0, r.output

    out = tmp_path / "sample.mp4"
    r = runner.invoke(app, ["infer", "--checkpoint", str(model_pt), "--spec", str(spec.run_dir() / "spec.toml"),
                            "--input", str(data / "videos" / "clip_0.mp4"), "--prompt", "A video of sks teal robot.",
                            "--negative-prompt", "red cube", "--steps", "2", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 9 and (frames[0].height, frames[0].width) == (32, 32)

    r = runner.invoke(app, ["infer", "--checkpoint", str(model_pt), "--spec", str(spec_file), "--input",
                            str(data / "videos" / "clip_0.mp4"), "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code == 2 and "--prompt TEXT or --prompt-embedding" in r.output
