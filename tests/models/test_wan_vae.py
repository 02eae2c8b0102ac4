"""Wan2.1 VAE: both weight layouts through the spec, key conversion, equality with diffusers."""

import pytest
import torch

from cosmos_train.errors import CosmosTrainError, SpecError
from cosmos_train.models.tokenizer import build_tokenizer
from cosmos_train.models.wan_vae import (WAN21_LATENT_MEAN, WAN21_LATENT_STD, config_from_original,
                                         convert_original_state_dict, diffusers_to_original_key,
                                         original_to_diffusers_key)
from cosmos_train.spec import TokenizerSpec
from cosmos_train.spec_loading import load_spec_text
from tests.tiny_assets import TINY_VAE, original_state_dict, save_vae_both_layouts, tiny_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def layouts(vae, tmp_path_factory):
    return save_vae_both_layouts(vae, tmp_path_factory.mktemp("vae"))


def _video(T=9, H=32, W=48, seed=0):
    return torch.randint(0, 256, (1, 3, T, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_key_conversion_matches_diffusers_and_round_trips(vae):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = original_state_dict(vae)
    assert set(original).isdisjoint(vae.state_dict())  # the names really differ
    ours = convert_original_state_dict(original, config_from_original({k: v.shape for k, v in original.items()}))
    theirs = convert_wan_vae_to_diffusers(original)
    assert set(ours) == set(theirs) == set(vae.state_dict())
    assert all(ours[k] is theirs[k] for k in ours)  # same tensor under the same new name
    for key in vae.state_dict():
        back = diffusers_to_original_key(key, num_levels=4, num_res_blocks=2)
        assert original_to_diffusers_key(back, num_levels=4, num_res_blocks=2) == key


@pytest.mark.parametrize("res_blocks,levels", [(1, 3), (3, 4)])
def test_key_conversion_round_trips_other_depths(res_blocks, levels):
    from diffusers import AutoencoderKLWan

    cfg = dict(TINY_VAE, num_res_blocks=res_blocks, dim_mult=[1, 2, 4, 4][:levels],
               temperal_downsample=[False, True, True][:levels - 1])
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    keys = list(model.state_dict())
    original = [diffusers_to_original_key(k, num_levels=levels, num_res_blocks=res_blocks) for k in keys]
    assert len(set(original)) == len(keys)
    assert [original_to_diffusers_key(k, num_levels=levels, num_res_blocks=res_blocks) for k in original] == keys
    shapes = {o: model.state_dict()[k].shape for o, k in zip(original, keys)}
    got = config_from_original(shapes)
    assert {k: got[k] for k in cfg} == cfg


def test_both_layouts_load_through_the_spec(vae, layouts):
    diffusers_dir, pth = layouts
    want = vae.state_dict()
    for path in (diffusers_dir, diffusers_dir.parent, pth, pth.parent.parent):  # vae/, root, file, model dir
        tok = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(path)))
        got = tok.vae.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), path
        assert (tok.latent_channels, tok.temporal_compression, tok.spatial_compression) == (16, 4, 8)
        assert tok.vae.config.latents_mean == WAN21_LATENT_MEAN and tok.vae.config.latents_std == WAN21_LATENT_STD


def test_encode_decode_equal_diffusers(vae, layouts):
    tok = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[1])))  # upstream layout, converted
    video = _video()
    latent = tok.encode(video)
    assert latent.shape == (1, 16, 3, 4, 6) and latent.dtype == torch.float32
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mu = vae.encode(video.float() / 127.5 - 1).latent_dist.mode()
        ref_latent = (mu - mean) / std
        ref_video = vae.decode(latent * std + mean).sample
    assert _rel(latent, ref_latent) <= 1e-5
    ours = torch.cat([x for _, x in tok.decode_chunks(latent)], dim=2)
    assert ours.shape == ref_video.shape == (1, 3, 9, 32, 48)
    assert _rel(ours, ref_video) <= 1e-5
    decoded = tok.decode(latent)
    assert decoded.dtype == torch.uint8 and decoded.shape == video.shape
    assert (decoded.float() - ((ref_video.clamp(-1, 1) + 1) * 127.5).round()).abs().max() <= 1


def test_chunked_encode_is_causal_and_equals_whole_clip(vae, layouts):
    tok = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[0])))
    video = _video(T=17, H=16, W=16, seed=1)
    whole = tok.encode(video)
    chunks = torch.cat([mu for _, mu in tok.encode_chunks(video, dtype=torch.float32)], dim=2)
    with torch.no_grad():
        ref = vae.encode(video.float() / 127.5 - 1).latent_dist.mode()  # diffusers: the whole clip at once
    assert _rel(chunks, ref) <= 1e-5
    # causal: the first 9 frames give the first 3 latent frames whatever follows
    torch.testing.assert_close(tok.encode(video[:, :, :9]), whole[:, :, :3], rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(tmp_path, layouts):
    with pytest.raises(SpecError, match="model.tokenizer.path"):
        load_spec_text('[model.tokenizer]\nkind = "wan2.1"\n[model.architecture]\nlatent_channels = 16')
    with pytest.raises(CosmosTrainError, match="no Wan2.1 VAE here"):
        build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(tmp_path)))
    bad = tmp_path / "tokenizer.pth"
    sd = torch.load(layouts[1], weights_only=True)
    sd.pop("decoder.head.0.gamma")
    torch.save(sd, bad)
    with pytest.raises(CosmosTrainError, match="1 missing"):
        build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(bad)))
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CosmosTrainError, match="cannot read the VAE weights"):
        build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(tmp_path / "junk.pth")))


def test_bf16_compute_stays_close_and_offload_returns_to_cpu(layouts):
    fp32 = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[0])))
    bf16 = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[0]), dtype="bf16"))
    video = _video(T=5, H=16, W=16, seed=2)
    a, b = fp32.encode(video), bf16.encode(video)
    assert b.dtype == torch.float32 and next(bf16.vae.parameters()).dtype == torch.bfloat16
    assert _rel(b, a) < 5e-2
    assert (bf16.decode(b).int() - fp32.decode(a).int()).abs().float().mean() < 8
    assert fp32.identity() == bf16.identity()  # same weights: a cache made by either is valid for both
    bf16.offload()
    assert next(bf16.vae.parameters()).device.type == "cpu"


def test_spatial_tiling_runs_diffusers_tiled_path(layouts):
    plain = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[0])))
    tiled = build_tokenizer(TokenizerSpec(kind="wan2.1", path=str(layouts[0]), tiling=True))
    # tiles of 32 px with 16 px overlap instead of 256/192, so a 64 px clip is split
    tiled.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                            tile_sample_stride_height=16, tile_sample_stride_width=16)
    video = _video(T=5, H=64, W=64, seed=3)
    a, b = plain.encode(video), tiled.encode(video)
    assert a.shape == b.shape == (1, 16, 2, 8, 8)
    assert not torch.equal(a, b) and _rel(b, a) < 0.5  # blended tiles: close, not equal
    assert tiled.decode(b).shape == video.shape
    assert tiled.identity() != plain.identity()  # a cache made with tiling is not one made without
