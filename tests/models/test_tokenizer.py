"""Tokenizer: exact round trip of the space-to-depth tokenizer, shapes, interface."""

import pytest
import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.tokenizer import SpaceToDepthTokenizer, VideoTokenizer, build_tokenizer
from cosmos_train.spec import TokenizerSpec


@pytest.mark.parametrize("s", [1, 2, 4])
def test_round_trip_is_exact(s):
    tok = SpaceToDepthTokenizer(s)
    video = torch.randint(0, 256, (2, 3, 9, 8, 16), generator=torch.Generator().manual_seed(s), dtype=torch.uint8)
    latent = tok.encode(video)
    assert latent.dtype == torch.float32
    assert latent.shape == (2, 3 * 4 * s * s, 3, 8 // s, 16 // s) == (2, *tok.latent_shape(9, 8, 16))
    assert latent.min() >= -1 and latent.max() <= 1
    assert torch.equal(tok.decode(latent), video)


def test_layout_first_frame_replicated():
    tok = build_tokenizer(TokenizerSpec())
    assert isinstance(tok, VideoTokenizer)
    assert (tok.latent_channels, tok.temporal_compression, tok.spatial_compression) == (48, 4, 2)
    video = torch.randint(0, 256, (1, 3, 5, 4, 4), dtype=torch.uint8)
    latent = tok.encode(video)
    scaled = video.float() / 127.5 - 1
    # channel (colour, frame-in-group, row, col): latent frame 0 holds frame 0 four times
    groups = latent[0, :, 0, 1, 0].reshape(3, 4, 2, 2)
    for k in range(4):
        torch.testing.assert_close(groups[:, k], scaled[0, :, 0, 2:4, 0:2])
    torch.testing.assert_close(latent[0, :, 1, 0, 1].reshape(3, 4, 2, 2), scaled[0, :, 1:5, 0:2, 2:4])
    assert tok.video_frames(2) == 5


def test_bad_sizes_name_the_rule():
    tok = SpaceToDepthTokenizer(2)
    with pytest.raises(CosmosTrainError, match="4k\\+1"):
        tok.latent_shape(8, 8, 8)
    with pytest.raises(CosmosTrainError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 5, 7, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.zeros(1, 3, 5, 8, 8))
